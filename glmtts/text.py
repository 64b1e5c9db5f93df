"""Text cost units: a length measure proportional to how long the text takes to speak.

Upstream's thresholds count characters (`chars`), which treats "你" and "a" alike although one is a
syllable and the other a fraction of a word. The scheduler predicts service time from `units`
instead. One unit is the time of one spoken Chinese character:

- Mandarin runs at ~4-5 characters (syllables) per second, ~0.22 s each: that is **1 unit**.
  Japanese kana and Hangul syllables count the same. (Both are spoken somewhat faster, ~0.13-0.18 s
  per mora or syllable, so they are slightly overestimated; one weight keeps the model simple.)
- English runs at ~2.5-3 words per second (150-180 wpm), ~0.33-0.4 s a word, i.e. 1.5-1.8 units:
  a Latin-script (or Greek/Cyrillic) **word is 1.5 units** (0.33 s, the fast end).
- Digits are read one syllable each in Chinese ("2024" -> 二零二四): **1 unit per digit**.
- A pause punctuation mark (，。！？；：、… , . ! ? ; :) is a short pause, ~0.1 s: **0.5 units**,
  counted per character so that "..." pauses longer than ".".
- Whitespace, other symbols, emoji and control characters are silent: 0 units.

All weights are dyadic fractions, so float sums are exact: `units` is exactly additive across any
boundary that no token can straddle (whitespace or pause punctuation), whatever the order of
summation.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

SYLLABLE_UNITS = 1.0  # a CJK ideograph, a kana, a Hangul syllable
WORD_UNITS = 1.5  # a Latin/Greek/Cyrillic word
DIGIT_UNITS = 1.0  # an ASCII or full-width digit
PAUSE_UNITS = 0.5  # a pause punctuation mark

_Ranges = Iterable[tuple[int, int]]  # inclusive code point ranges

_IDEOGRAPHS: _Ranges = (
    (0x3005, 0x3005),  # 々 iteration mark: repeats the previous ideograph's syllable
    (0x3007, 0x3007),  # 〇 ideographic zero, read "líng"
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x2A6DF),  # Extension B
    (0x2A700, 0x2EBEF),  # Extensions C, D, E, F
    (0x2EBF0, 0x2EE5F),  # Extension I
    (0x2F800, 0x2FA1F),  # CJK Compatibility Ideographs Supplement
    (0x30000, 0x323AF),  # Extensions G, H
)
_KANA: _Ranges = (
    # Voiced sound marks (U+3099-309C, U+FF9E-FF9F) are left out: they modify the kana before them.
    (0x3041, 0x3096),  # hiragana
    (0x309D, 0x309F),  # hiragana iteration marks, digraph より
    (0x30A1, 0x30FA),  # katakana
    (0x30FC, 0x30FF),  # prolonged sound mark ー (a mora of its own), iteration marks, digraph コト
    (0x31F0, 0x31FF),  # katakana phonetic extensions (small kana)
    (0xFF66, 0xFF9D),  # half-width katakana, incl. half-width ｰ
    (0x1B000, 0x1B16F),  # kana supplement, extended-A, small kana extension
)
_HANGUL: _Ranges = (
    # Conjoining medial vowels and final consonants (U+1160-11FF, U+D7B0-D7FF) are left out: with
    # the leading consonant before them they spell one syllable, which the leading jamo counts.
    (0x1100, 0x115F),  # leading consonant jamo
    (0x3131, 0x318E),  # compatibility jamo (standalone, e.g. ㅋㅋ)
    (0xA960, 0xA97C),  # leading consonant jamo extended-A
    (0xAC00, 0xD7A3),  # precomposed syllables
    (0xFFA0, 0xFFDC),  # half-width jamo
)
_WORD_BLOCKS: _Ranges = (
    (0x0041, 0x024F),  # Basic Latin, Latin-1 Supplement, Latin Extended-A/B (letters filtered below)
    (0x0250, 0x02AF),  # IPA extensions
    (0x0370, 0x03FF),  # Greek and Coptic
    (0x0400, 0x052F),  # Cyrillic, Cyrillic Supplement
    (0x1C80, 0x1C8F),  # Cyrillic Extended-C
    (0x1E00, 0x1FFF),  # Latin Extended Additional, Greek Extended
    (0x2C60, 0x2C7F),  # Latin Extended-C
    (0xA640, 0xA69F),  # Cyrillic Extended-B
    (0xA720, 0xA7FF),  # Latin Extended-D
    (0xAB30, 0xAB6F),  # Latin Extended-E
    (0xFB00, 0xFB06),  # Latin ligatures (ﬁ)
    (0xFF21, 0xFF5A),  # full-width Latin
)
# Combining marks continue a word, so decomposed (NFD) "naïve" is one word, not two.
_MARKS: _Ranges = (
    (0x0300, 0x036F),
    (0x0483, 0x0489),
    (0x1AB0, 0x1AFF),
    (0x1DC0, 0x1DFF),
    (0x20D0, 0x20FF),
    (0xFE20, 0xFE2F),
)
# Joiners allowed *inside* a word (don't, l'homme, well-known), never at its ends.
_JOINERS = "'\u2019\u02bc-\u2010\u2011"
_DIGITS: _Ranges = ((0x30, 0x39), (0xFF10, 0xFF19))
_PAUSES = ",.!?;:\u3001\u3002\u2026\uff0c\uff01\uff1f\uff1b\uff1a\uff0e\uff61\uff64"


def _letters(blocks: _Ranges) -> list[tuple[int, int]]:
    # Keep only the letters of the blocks (drops ×, ÷, Greek ; and ·, ҂, ...), as ranges.
    ranges: list[tuple[int, int]] = []
    for lo, hi in blocks:
        for cp in range(lo, hi + 1):
            if unicodedata.category(chr(cp)).startswith("L"):
                if ranges and ranges[-1][1] == cp - 1:
                    ranges[-1] = (ranges[-1][0], cp)
                else:
                    ranges.append((cp, cp))
    return ranges


def _class(ranges: _Ranges) -> str:
    parts = (re.escape(chr(lo)) + ("" if lo == hi else "-" + re.escape(chr(hi))) for lo, hi in ranges)
    return "[" + "".join(parts) + "]"


_LETTER = _class(_letters(_WORD_BLOCKS))
_LETTER_OR_MARK = _class([*_letters(_WORD_BLOCKS), *_MARKS])
# The classes are pairwise disjoint and a joiner is never a letter or mark, so the regex never
# backtracks more than one character: the scan is linear in the text.
_TOKENS = re.compile(
    rf"(?P<word>{_LETTER}{_LETTER_OR_MARK}*(?:[{re.escape(_JOINERS)}]{_LETTER}{_LETTER_OR_MARK}*)*)"
    rf"|(?P<syllables>{_class([*_IDEOGRAPHS, *_KANA, *_HANGUL])}+)"
    rf"|(?P<digits>{_class(_DIGITS)}+)"
    rf"|(?P<pauses>[{re.escape(_PAUSES)}]+)"
)


@dataclass(frozen=True, kw_only=True)
class TextCost:
    chars: int  # len(text), what upstream's length thresholds count
    units: float  # expected speech duration, in units of ~0.22 s


def units(text: str) -> float:
    """Cost units of `text` (see the module docstring): >= 0, exact, additive across whitespace."""
    total = 0.0
    for match in _TOKENS.finditer(text):
        kind = match.lastgroup
        if kind == "word":
            total += WORD_UNITS
        else:
            run = match.end() - match.start()
            if kind == "syllables":
                total += SYLLABLE_UNITS * run
            elif kind == "digits":
                total += DIGIT_UNITS * run
            else:
                total += PAUSE_UNITS * run
    return total


def chars(text: str) -> int:
    """Length in code points, as upstream's 50/200-character thresholds count it."""
    return len(text)


def cost(text: str) -> TextCost:
    """Both measures of `text` at once."""
    return TextCost(chars=chars(text), units=units(text))
