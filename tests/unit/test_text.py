from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from glmtts.text import (
    DIGIT_UNITS,
    PAUSE_UNITS,
    SYLLABLE_UNITS,
    WORD_UNITS,
    TextCost,
    chars,
    cost,
    units,
)

WHITESPACE = " \t\n\r\u3000\u00a0\u2028"
PAUSES = ",.!?;:，。！？；：、…．｡､"

# Text drawn from the scripts the cost model distinguishes, plus anything at all.
scripts = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from("abcXYZéñ'-’ ΑΩжЯ\u0301")),
    st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x4E50)),
    st.text(alphabet=st.sampled_from("あいカキｶﾞ가나ᄀ\u1161ㅋ0123456789０１ 😀#")),
    st.text(alphabet=st.sampled_from("ab中1 ,.!?，。…\n'-")),
)
separators = st.text(alphabet=st.sampled_from(WHITESPACE + PAUSES), min_size=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0.0),
        ("你好，世界。", 4 * SYLLABLE_UNITS + 2 * PAUSE_UNITS),
        ("今天天气很好。", 6 * SYLLABLE_UNITS + PAUSE_UNITS),
        ("Hello, world!", 2 * WORD_UNITS + 2 * PAUSE_UNITS),
        ("Don't stop the well-known rock'n'roll", 5 * WORD_UNITS),
        ("l’homme", WORD_UNITS),
        ("-dash- 'quoted'", 2 * WORD_UNITS),
        ("naïve café", 2 * WORD_UNITS),
        ("nai\u0308ve", WORD_UNITS),  # decomposed ï: the combining mark continues the word
        ("Привет, мир", 2 * WORD_UNITS + PAUSE_UNITS),
        ("Καλημέρα", WORD_UNITS),
        ("ＡＢＣ", WORD_UNITS),
        ("我用iPhone打电话", 5 * SYLLABLE_UNITS + WORD_UNITS),
        ("2024年", 4 * DIGIT_UNITS + SYLLABLE_UNITS),
        ("１２３", 3 * DIGIT_UNITS),
        ("3.14", 3 * DIGIT_UNITS + PAUSE_UNITS),
        ("mp3", WORD_UNITS + DIGIT_UNITS),
        ("...", 3 * PAUSE_UNITS),
        ("……", 2 * PAUSE_UNITS),
        ("、；：！？", 5 * PAUSE_UNITS),
        ("こんにちは", 5 * SYLLABLE_UNITS),
        ("コーヒー", 4 * SYLLABLE_UNITS),
        ("ｶﾞｷﾞ", 2 * SYLLABLE_UNITS),  # half-width voiced marks belong to the kana before them
        ("안녕하세요", 5 * SYLLABLE_UNITS),
        ("\u1100\u1161\u11a8", SYLLABLE_UNITS),  # conjoining jamo spelling one syllable (각)
        ("ㅋㅋㅋ", 3 * SYLLABLE_UNITS),
        ("𠀀〇々", 3 * SYLLABLE_UNITS),
        ('😀🎉 #@$%^&*()[]{}<>~=+_|\\/"', 0.0),
        (" \t\n\r\u3000\x00\x07", 0.0),
    ],
)
def test_concrete_values(text: str, expected: float) -> None:
    assert units(text) == expected


def test_weights_are_dyadic() -> None:
    # Sums of multiples of these are exact in binary floating point, which additivity relies on.
    for weight in (SYLLABLE_UNITS, WORD_UNITS, DIGIT_UNITS, PAUSE_UNITS):
        assert (weight * 4).is_integer()


def test_chars_is_code_points() -> None:
    assert chars("") == 0
    assert chars("你好, ok") == 6
    assert chars("𠀀") == 1


def test_cost_combines_both() -> None:
    assert cost("你好 world") == TextCost(chars=8, units=2 * SYLLABLE_UNITS + WORD_UNITS)


def test_long_text_is_linear() -> None:
    # Patterns that would make a backtracking tokenizer quadratic; must still be exact.
    assert units("a-" * 50_000) == WORD_UNITS
    assert units("a'" * 50_000 + "!") == WORD_UNITS + PAUSE_UNITS
    assert units("中" * 100_000) == 100_000 * SYLLABLE_UNITS


@given(scripts)
def test_never_negative(text: str) -> None:
    assert units(text) >= 0


@given(scripts, separators, scripts)
def test_additive_across_separator(a: str, sep: str, b: str) -> None:
    assert units(a + sep + b) == units(a) + units(sep) + units(b)


@given(scripts, st.text(alphabet=st.sampled_from(WHITESPACE)), st.text(alphabet=st.sampled_from(WHITESPACE)))
def test_surrounding_whitespace_is_free(text: str, before: str, after: str) -> None:
    assert units(before + text + after) == units(text)


@given(st.text(alphabet=st.sampled_from(WHITESPACE)))
def test_whitespace_is_free(text: str) -> None:
    assert units(text) == 0


@given(scripts)
def test_at_most_one_and_a_half_units_per_char(text: str) -> None:
    # No token is worth more than WORD_UNITS, and each takes at least one character.
    assert units(text) <= WORD_UNITS * len(text)
