"""Cutting a text for fan-out (glmtts.split.split_balanced, split_tapered; the sidecar's choice of cut)
and the ``fanout`` config section."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmtts.split import even_and_tapered, longest_first, split_balanced, split_tapered
from glmtts.text import units
from scheduler.config import ConfigError, parse_config
from scheduler.core.makespan import expected_makespan, tail_share
from scheduler.runtime.fanout import whole_cut

ZH = "今天天气很好。我们去公园散步吧！你觉得怎么样？" * 22  # 506 characters, sentences of 7 and 8
EN = " ".join(["The quick brown fox jumps over the lazy dog.", "It was not amused!", "Why would it be?",
               "Dogs, as a rule, prefer to sleep in the sun; foxes do not care."] * 6)


def squeezed(text: str) -> str:
    return re.sub(r"\s", "", text)


@pytest.mark.parametrize("text", [ZH, EN], ids=["zh", "en"])
@pytest.mark.parametrize("lanes", [2, 3, 4, 8])
def test_pieces_are_balanced_over_the_lanes(text: str, lanes: int) -> None:
    pieces = split_balanced(text, lanes=lanes, min_chars=20, max_chars=1000)
    assert len(pieces) <= lanes
    assert squeezed("".join(pieces)) == squeezed(text)
    # Balanced: no piece is much longer than an even share (a sentence's length of slack).
    share = len(text) / lanes
    assert max(map(len, pieces)) <= share + 70


def test_a_text_needing_more_pieces_than_lanes_gets_pieces_of_the_most_allowed() -> None:
    pieces = split_balanced(ZH, lanes=2, min_chars=40, max_chars=200)
    assert len(pieces) == 3 and max(map(len, pieces)) <= 200


def test_a_streamed_text_starts_with_a_short_piece_then_balances_the_rest() -> None:
    pieces = split_balanced(ZH, lanes=4, min_chars=40, max_chars=200, first_chars=20)
    assert len(pieces[0]) <= 20 and pieces[0] == "今天天气很好。我们去公园散步吧！"
    assert len(pieces) == 5 and squeezed("".join(pieces)) == squeezed(ZH)
    assert max(map(len, pieces[1:])) - min(map(len, pieces[1:])) <= 10


def test_one_lane_and_short_texts() -> None:
    assert split_balanced("Short.", lanes=4, min_chars=10, max_chars=100) == ["Short."]
    assert split_balanced("   ", lanes=4, min_chars=10, max_chars=100) == []
    assert split_balanced("One. Two.", lanes=4, min_chars=4, max_chars=100, first_chars=5) == ["One.", "Two."]
    with pytest.raises(ValueError, match="lanes"):
        split_balanced(ZH, lanes=0, min_chars=10, max_chars=100)


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab 你好。.!?，,\n"), max_size=400),
       lanes=st.integers(1, 8), first=st.one_of(st.none(), st.integers(1, 30)))
def test_any_text_cuts_into_non_empty_pieces_within_bounds_in_order(text: str, lanes: int, first: int | None) -> None:
    pieces = split_balanced(text, lanes=lanes, min_chars=5, max_chars=60, first_chars=first)
    assert all(pieces) and all(p == p.strip() for p in pieces)
    assert all(len(p) <= 60 for p in pieces)
    if first is not None and pieces:
        assert len(pieces[0]) <= first
    assert squeezed("".join(pieces)) == squeezed(text)


def test_the_config_section_checks_its_bounds_by_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("fanout: {min_chars: 50, max_chars: 40, first_chars: 60, crossfade_s: 0.1, pause_s: 0.2}",
                     check_paths=False)
    text = str(info.value)
    assert "fanout.max_chars: must be at least min_chars (50)" in text
    assert "fanout.first_chars: must be at most max_chars (40)" in text
    assert "fanout.pause_s: join with a crossfade or a pause, not both" in text
    with pytest.raises(ConfigError, match=r"fanout\.pieces_per_slot"):
        parse_config("fanout: {pieces_per_slot: 0}", check_paths=False)
    with pytest.raises(ConfigError, match=r"fanout\.crossfade_s"):
        parse_config("fanout: {crossfade_s: 9.0}", check_paths=False)
    with pytest.raises(ConfigError, match=r"fanout\.enabled"):
        parse_config("fanout: {enabled: 'yes'}", check_paths=False)
    config = parse_config("fanout: {enabled: true, pause_s: 0.2, crossfade_s: 0}", check_paths=False).fanout
    assert (config.enabled, config.pause_s, config.crossfade_s) == (True, 0.2, 0.0)


# --- The tapered cut (split_tapered, and the sidecar's choice: scheduler.runtime.fanout.whole_cut) ----


@pytest.mark.parametrize("text", [ZH, EN], ids=["zh", "en"])
def test_a_tapered_cut_has_one_big_piece_per_lane_and_the_held_back_share_in_small_ones(text: str) -> None:
    pieces = split_tapered(text, lanes=4, per_lane=2, tail_share=0.2, min_chars=20, max_chars=200)
    assert squeezed("".join(pieces)) == squeezed(text) and all(p and len(p) <= 200 for p in pieces)
    head, tail = pieces[:4], pieces[4:]
    assert 1 <= len(tail) <= 4
    # The head ends at the sentence end nearest 80 % of the text (a sentence of slack).
    assert abs(sum(map(len, tail)) - 0.2 * len(text)) <= 70
    assert min(map(len, head)) > max(map(len, tail))
    # Started longest first, the four big pieces start first, one on each lane.
    assert sorted(longest_first(pieces)[:4]) == [0, 1, 2, 3]


def test_without_a_share_to_hold_back_the_tapered_cut_is_the_even_one() -> None:
    even = split_balanced(EN, lanes=8, min_chars=20, max_chars=200)
    assert split_tapered(EN, lanes=4, per_lane=2, tail_share=0.0, min_chars=20, max_chars=200) == even
    assert split_tapered(EN, lanes=8, per_lane=1, tail_share=0.3, min_chars=20, max_chars=200) == \
        split_balanced(EN, lanes=8, min_chars=20, max_chars=200)
    # One sentence: nowhere to cut the head off at.
    one = "A single long sentence with no end inside it, only commas, and more words, and still more"
    assert split_tapered(one, lanes=2, per_lane=2, tail_share=0.3, min_chars=10, max_chars=40) == \
        split_balanced(one, lanes=4, min_chars=10, max_chars=40)
    assert even_and_tapered(EN, lanes=4, per_lane=2, tail_share=0.2, min_chars=20, max_chars=200)[0] == even
    # A text that needs more pieces than lanes × per_lane even at max_chars: no head to size a tail
    # behind, and the tapered cut is not worked out at all (the even cut is returned twice).
    long = EN * 20
    even, tapered = even_and_tapered(long, lanes=4, per_lane=2, tail_share=0.3, min_chars=20, max_chars=60)
    assert len(even) > 8 and tapered is even
    assert even == split_balanced(long, lanes=8, min_chars=20, max_chars=60)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tail_share": 1.0}, "tail_share"), ({"tail_share": -0.1}, "tail_share"), ({"tail_share": True}, "tail_share"),
    ({"per_lane": 0}, "per_lane"), ({"lanes": 0}, "lanes"), ({"min_chars": 0}, "min_chars"),
])
def test_a_tapered_cut_refuses_bad_arguments_by_name(kwargs: dict[str, Any], match: str) -> None:
    arguments: dict[str, Any] = {"lanes": 4, "per_lane": 2, "tail_share": 0.2, "min_chars": 20, "max_chars": 200}
    with pytest.raises(ValueError, match=match):
        split_tapered(EN, **{**arguments, **kwargs})


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab 你好。.!?，,\n"), max_size=400), lanes=st.integers(1, 6),
       per_lane=st.integers(1, 3), share=st.floats(0.0, 0.9))
def test_any_text_cuts_tapered_into_non_empty_pieces_within_bounds_in_order(
        text: str, lanes: int, per_lane: int, share: float) -> None:
    pieces = split_tapered(text, lanes=lanes, per_lane=per_lane, tail_share=share, min_chars=5, max_chars=60)
    assert all(pieces) and all(p == p.strip() and len(p) <= 60 for p in pieces)
    assert squeezed("".join(pieces)) == squeezed(text)


def _seconds(piece: str) -> float:
    """The seed's cost line: 0.3125 s a request plus 0.159375 s a unit."""
    return 0.3125 + 0.159375 * units(piece)


def test_the_sidecar_tapers_a_whole_answer_only_when_that_is_expected_sooner() -> None:
    config = parse_config("fanout: {enabled: true, min_chars: 20, max_chars: 200, pieces_per_slot: 2}",
                          check_paths=False).fanout
    text = EN  # about 900 characters: 8 pieces of at most 200
    tapered, chosen = whole_cut(text, lanes=4, config=config, sigma=0.25, seconds=_seconds)
    assert chosen and tapered == split_tapered(text, lanes=4, per_lane=2, tail_share=tail_share(0.25, 4),
                                               min_chars=20, max_chars=200)

    def makespan(pieces: list[str], sigma: float) -> float:
        return expected_makespan([_seconds(pieces[i]) for i in longest_first(pieces)], 4, sigma)

    even = split_balanced(text, lanes=8, min_chars=20, max_chars=200)
    assert makespan(tapered, 0.25) < makespan(even, 0.25)
    # No noise measured, or tapering turned off: the even cut.
    assert whole_cut(text, lanes=4, config=config, sigma=0.0, seconds=_seconds) == (even, False)
    off = config.model_copy(update={"taper": False})
    assert whole_cut(text, lanes=4, config=off, sigma=0.25, seconds=_seconds) == (even, False)


def test_a_tapered_cut_expected_later_than_the_even_one_is_not_taken() -> None:
    config = parse_config("fanout: {enabled: true, min_chars: 20, max_chars: 200, pieces_per_slot: 2}",
                          check_paths=False).fanout
    text = EN  # about 900 characters: 8 pieces of at most 200
    even = split_balanced(text, lanes=8, min_chars=20, max_chars=200)
    tapered, chosen = whole_cut(text, lanes=4, config=config, sigma=0.25, seconds=_seconds)
    assert chosen and tapered != even
    # Were the tapered cut's own pieces slow to speak (a cost line that says so), the even one stays.
    slow = set(tapered) - set(even)
    assert whole_cut(text, lanes=4, config=config, sigma=0.25,
                     seconds=lambda piece: _seconds(piece) * (10 if piece in slow else 1)) == (even, False)


def test_taper_is_a_strict_boolean() -> None:
    assert parse_config("fanout: {}", check_paths=False).fanout.taper is True
    with pytest.raises(ConfigError, match=r"fanout\.taper"):
        parse_config("fanout: {taper: 'no'}", check_paths=False)


def test_a_text_needing_more_pieces_than_planned_is_cut_evenly_without_weighing() -> None:
    config = parse_config("fanout: {enabled: true, min_chars: 20, max_chars: 60, pieces_per_slot: 2}",
                          check_paths=False).fanout
    text = EN * 20  # about 3700 characters: far more than 8 pieces of 60
    calls: list[str] = []

    def seconds(piece: str) -> float:
        calls.append(piece)
        return _seconds(piece)

    assert whole_cut(text, lanes=4, config=config, sigma=0.3, seconds=seconds) == \
        (split_balanced(text, lanes=8, min_chars=20, max_chars=60), False)
    assert calls == []
