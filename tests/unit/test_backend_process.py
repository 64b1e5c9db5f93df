from __future__ import annotations

import signal

from backend.process import MAX_LINE_BYTES, LineSplitter, describe_exit


def test_complete_lines_come_out_and_a_partial_one_waits() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntwo\r\nthr") == ["one", "two"]
    assert splitter.feed(b"ee") == []
    assert splitter.feed(b"\n\n") == ["three", ""]
    assert splitter.flush() == []


def test_the_last_line_without_newline_comes_out_on_flush() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"Running on http://127.0.0.1:1") == []
    assert splitter.flush() == ["Running on http://127.0.0.1:1"]
    assert splitter.flush() == []


def test_a_long_line_comes_out_in_bounded_pieces_and_nothing_is_lost() -> None:
    splitter = LineSplitter(max_bytes=4)
    assert splitter.feed(b"abcdefghij") == ["abcd", "efgh"]
    assert splitter.feed(b"k\nxy") == ["ijk"]
    assert splitter.flush() == ["xy"]
    big = LineSplitter()
    pieces = big.feed(b"x" * (3 * MAX_LINE_BYTES + 5) + b"\n")
    assert [len(p) for p in pieces] == [MAX_LINE_BYTES] * 3 + [5]


def test_a_line_of_exactly_the_limit_is_one_line() -> None:
    splitter = LineSplitter(max_bytes=4)
    assert splitter.feed(b"abcd\n") == ["abcd"]
    assert splitter.feed(b"abcd") == ["abcd"]
    assert splitter.feed(b"\n") == [""]


def test_undecodable_bytes_are_replaced() -> None:
    splitter = LineSplitter()
    assert splitter.feed("语音 ok\n".encode() + b"\xff\xfe bad\n") == ["语音 ok", "\ufffd\ufffd bad"]


def test_exit_descriptions() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGTERM) == "killed by SIGTERM"
    assert describe_exit(-200) == "killed by signal 200"
