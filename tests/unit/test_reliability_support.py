"""The reliability suite's own arithmetic: how a request's outcome is told, what counts as lost, the
worst loop lag between two readings of the lag histogram, and how the report shows what is missing."""

from __future__ import annotations

import json

import pytest

from tests.reliability.hostile import Raw, tally_of
from tests.reliability.report import render
from tests.reliability.support import LagHistogram, Outcome, Tally

INF = float("inf")
BOUNDS = (0.001, 0.01, 0.1, INF)


def error(reason: str) -> bytes:
    return json.dumps({"detail": "x", "reason": reason}).encode()


@pytest.mark.parametrize("status,headers,body,expected", [
    (200, {"X-Backend": "gpu0-0"}, b'{"success":true}', Outcome.ANSWERED),
    (500, {"x-backend": "gpu0-0"}, b"", Outcome.ANSWERED),  # a backend's own error, passed on
    (502, {}, error("backend_failed"), Outcome.ANSWERED),
    (408, {}, error("deadline"), Outcome.ANSWERED),
    (408, {}, error("body_timeout"), Outcome.REFUSED),
    (400, {}, b"Bad Request: invalid header", Outcome.REFUSED),
    (401, {}, error("unauthorized"), Outcome.REFUSED),
    (429, {}, error("queue_full"), Outcome.REFUSED),
    (503, {}, error("no_backend"), Outcome.REFUSED),
    (200, {}, b'{"status":"alive"}', Outcome.SERVED),
    (500, {}, b"500 Internal Server Error", Outcome.SERVED),
])
def test_a_complete_answer_is_told_by_who_gave_it(status: int, headers: dict[str, str], body: bytes,
                                                  expected: Outcome) -> None:
    assert Tally().answer(status, headers, body) is expected


def test_lost_counts_admitted_requests_without_a_final_answer() -> None:
    tally = Tally()
    lost = [tally.lost]
    tally.answer(401, {}, error("unauthorized"))
    lost.append(tally.lost)  # refusals only: nothing admitted
    tally.answer(200, {"X-Backend": "a"}, b"")
    lost.append(tally.lost)
    assert lost == [None, None, 0]
    for outcome in (Outcome.NO_ANSWER, Outcome.CUT, Outcome.HUNG):
        tally.fail(outcome)
    assert (tally.lost, tally.admitted, tally.requests) == (3, 4, 5)
    assert tally.figures() == {"answered": 1, "refused": 1, "no answer": 1, "cut": 1, "hung": 1}
    with pytest.raises(AssertionError):
        tally.fail(Outcome.ANSWERED)


def test_lost_given_the_sidecars_count_of_admissions() -> None:
    refused = Tally()
    refused.answer(400, {}, b"")
    assert refused.lost_given(0) is None
    assert refused.lost_given(1) == 1  # admitted, and no answer came back to it

    served = Tally()
    served.answer(200, {"X-Backend": "a"}, b"")
    served.answer(200, {"X-Backend": "a"}, b"")
    assert served.lost_given(2) == 0
    assert served.lost_given(3) == 1
    served.fail(Outcome.CUT)  # the sidecar counts it admitted too: not lost twice
    assert served.lost_given(3) == 1


def test_a_raw_exchange_closed_mid_answer_is_a_cut() -> None:
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: a\r\n\r\nok"
    half = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    assert tally_of(Raw(whole + half, closed=True, seconds=0.1)).figures() == {"answered": 1, "cut": 1}
    # Still open: we stopped reading, the sidecar did not cut anything.
    assert tally_of(Raw(whole + half, closed=False, seconds=0.1)).figures() == {"answered": 1}
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"
    assert tally_of(Raw(chunked, closed=True, seconds=0.1)).figures() == {"cut": 1}


def test_the_worst_lag_between_two_readings_is_the_highest_bucket_that_grew() -> None:
    start = LagHistogram(started=10.0, bounds=BOUNDS, counts=(5, 6, 6, 6))
    later = LagHistogram(started=10.0, bounds=BOUNDS, counts=(9, 9, 11, 11))
    assert later.worst_since(start) == 0.1  # one new sample over 10 ms, under 100 ms
    assert later.samples_since(start) == 5 and start.samples_since(start) == 0
    assert start.worst_since(None) == 0.01  # since the probe started
    assert start.worst_since(start) == 0.0  # no new sample
    beyond = LagHistogram(started=10.0, bounds=BOUNDS, counts=(9, 9, 11, 12))
    assert beyond.worst_since(later) == INF
    # Another process on the same address: its counts start from nothing.
    other = LagHistogram(started=20.0, bounds=BOUNDS, counts=(1, 1, 1, 1))
    assert other.worst_since(later) == 0.001 and other.samples_since(later) == 1


def test_the_report_shows_none_as_a_dash_and_a_missing_lost_as_not_counted() -> None:
    records = [{"case": "a", "at": 0.0, "figures": {"lost": None, "status": None, "sent": 3}},
               {"case": "b", "at": 0.0, "figures": {"lost": 0, "sent": 2}},
               {"case": "c", "at": 0.0, "figures": {"sent": 1}}]
    table = render(records, "scripts/reliability")
    assert "| a | – | status –; sent 3 |" in table
    assert "| b | 0 | sent 2 |" in table
    assert "| c | not counted | sent 1 |" in table
