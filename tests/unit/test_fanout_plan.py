"""Cutting a text for fan-out (glmtts.split.split_balanced) and the ``fanout`` config section."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmtts.split import split_balanced
from scheduler.config import ConfigError, parse_config

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
