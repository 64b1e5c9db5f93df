"""Splitting a long text into pieces that separate backends can synthesize (issue 17's fan-out).

Pure and I/O free (the lowest layer, so the scheduler can use it). Lengths are Python ``str``
lengths, the way upstream counts characters.

How a text is cut
-----------------
1. **Sentences.** A sentence ends after a run of terminators -- CJK ``。！？；…`` (full-width
   ``！？；`` are those same code points; ``……`` is a run) or Latin ``.!?;`` -- plus the closing
   quotes and brackets right after it (``。”``, ``."``, ``?)``). A Latin terminator ends a sentence
   only when whitespace, the end, or a CJK character follows; that alone keeps decimals, versions,
   URLs and e-mail addresses (``3.14``, ``v1.2.3``, ``a.b@c.org``) whole. A period is not an end
   after an abbreviation of :data:`ABBREVIATIONS` (``Mr. Dr. e.g.``...; case-insensitive), after
   ``No.``/``Fig.`` when a digit follows, after an initial (one capital letter: ``J. R. R.``), or
   after :data:`SOFT_ABBREVIATIONS` (``etc. a.m. U.S.``) unless a capital letter or CJK follows.
   An ellipsis (``...``, ``…``) followed by a lowercase letter continues the sentence
   (``wait... what``).
2. **Quotes.** A boundary inside a quoted or bracketed span (“…” ‘…’ 「…」 『…』 "…" «…» (…) （…）)
   is not a sentence end. ``’`` between letters is an apostrophe. An unclosed quote runs to the end.
3. **Cut points inside a sentence** exist only in a sentence longer than the piece's limit, ranked:
   a sentence end inside quotes; ``，、：`` or ``,`` / ``:`` followed by whitespace (outside quotes
   before inside); whitespace (outside before inside); and last any grapheme boundary (a base
   character is never separated from its combining marks, a ZWJ sequence, emoji modifier, variation
   selector or flag pair stays whole; only a single cluster longer than the limit is cut inside).
   No cut of any rank falls inside a cluster ("。" followed by a combining mark keeps the mark).
4. **Pieces.** Greedy from the start: a piece ends at the cut point within its limit that (a) leaves
   it at least ``min_chars`` long if any cut point but a bare grapheme boundary can, then (b) has
   the best rank (a sentence end first), then (c) is the latest. (A short sentence before an
   over-long one is thus topped up to ``min_chars`` from the long one's first clause, never by a hard
   cut, which could leave the next piece starting with a comma.) The limit is ``max_chars``; the
   **first piece** uses ``first_chars`` (when given) and has no minimum: it is the longest run of
   whole sentences within ``first_chars``, and a first sentence longer than ``first_chars`` is cut
   like an over-long sentence (so the first piece is never empty and never over ``first_chars``).
   A last piece shorter than ``min_chars`` joins the one before it when that stays within that
   piece's limit. Other short pieces remain where whole sentences leave no choice
   (a short sentence between two that each nearly fill a piece).

The property kept (tested): every piece is non-empty, stripped, and at most its limit long; the
pieces are consecutive slices of ``text`` separated only by whitespace, so walking ``text`` and
skipping whitespace meets each piece in order and nothing else. Hence
``re.sub(r"\\s", "", "".join(pieces)) == re.sub(r"\\s", "", text)``, and
``normalize(" ".join(pieces)) == normalize(text)`` (``normalize`` collapsing whitespace runs to one
space and stripping) whenever every cut falls at whitespace, as in Latin text; a cut between two CJK
characters drops no character and needs no space: join those pieces with ``""``.

:func:`split_sentences` shows rules 1-2 alone; :func:`split_spans` gives the pieces as slices.
:func:`split_balanced` cuts as evenly as parallel slots finish soonest, :func:`split_tapered` big
pieces then small ones for noisy slots; :func:`longest_first` is the order to start them in.
"""

from __future__ import annotations

import bisect
import itertools
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from glmtts.text import units

__all__ = [
    "ABBREVIATIONS", "SOFT_ABBREVIATIONS", "even_and_tapered", "longest_first", "split_balanced", "split_sentences",
    "split_spans", "split_tapered", "split_text",
]

# Never end a sentence (titles and "for example"): the word before the period, lowercased.
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "vs", "e.g", "i.e", "jr", "sr", "mt"})
# End a sentence only before a capital letter or CJK ("at 5 p.m. The bus" vs "at 5 p.m. sharp").
SOFT_ABBREVIATIONS = frozenset({"etc", "a.m", "p.m", "u.s", "u.k", "inc", "ltd", "co"})
# Not an end when a digit follows ("No. 5", "Fig. 3"), else an ordinary word ("I said no.").
_NUMBER_ABBREVIATIONS = frozenset({"no", "fig", "vol", "p", "pp"})

_CJK_TERMINATORS = frozenset("。！？；…｡")
_LATIN_TERMINATORS = frozenset(".!?;")
_TERMINATORS = _CJK_TERMINATORS | _LATIN_TERMINATORS
_CJK_WEAK = frozenset("，、：､")
_LATIN_WEAK = frozenset(",:")
_PAIRS = {"“": "”", "‘": "’", "「": "」", "『": "』", "«": "»", "(": ")", "（": "）", '"': '"'}
_CLOSERS = frozenset(_PAIRS.values())

# Ranks of cut points, best first.
SENTENCE, QUOTED_SENTENCE, WEAK, QUOTED_WEAK, SPACE, QUOTED_SPACE, HARD = range(7)


@dataclass(frozen=True, slots=True)
class _Cut:
    """A place the text may be cut: before ``text[pos]``; `length` is its sentence's stripped length."""

    pos: int
    rank: int
    length: int


def _is_cjk(char: str) -> bool:
    """Ideographs, kana, Hangul and CJK punctuation: scripts written without spaces between words."""
    code = ord(char)
    return 0x2E80 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF \
        or 0xFF00 <= code <= 0xFFEF or 0x20000 <= code <= 0x3FFFF


def _extends(prev: str, char: str) -> bool:
    """Whether `char` continues the grapheme cluster `prev` belongs to (a simplified UAX #29)."""
    code = ord(char)
    if unicodedata.category(char) in ("Mn", "Me", "Mc") or char == "\u200d" or prev == "\u200d":
        return True
    if 0x1F3FB <= code <= 0x1F3FF or 0xFE00 <= code <= 0xFE0F or 0xE0020 <= code <= 0xE007F:
        return True
    return prev == "\r" and char == "\n"


def _grapheme_starts(text: str) -> list[int]:
    """Positions 1..len-1 where a new grapheme cluster starts (regional indicators pair up as flags)."""
    if text.isascii():  # every character starts one, but the \n of \r\n
        return [i for i in range(1, len(text)) if text[i] != "\n" or text[i - 1] != "\r"]
    starts: list[int] = []
    run = 0  # regional indicators in a row so far
    for index in range(1, len(text)):
        prev, char = text[index - 1], text[index]
        run = run + 1 if 0x1F1E6 <= ord(prev) <= 0x1F1FF else 0
        if 0x1F1E6 <= ord(char) <= 0x1F1FF and run % 2 == 1:
            continue
        if not _extends(prev, char):
            starts.append(index)
    return starts


_LONGEST_ABBREVIATION = 5


def _word_before(text: str, end: int) -> str:
    """The lowercased non-space token ending at `end` (without leading quotes or brackets).

    Looks back at most one character more than the longest abbreviation (a longer token is returned
    cut, so it matches none), so that a hostile run of terminators costs linear time.
    """
    start = end
    while start > 0 and end - start <= _LONGEST_ABBREVIATION and not text[start - 1].isspace() \
            and text[start - 1] not in _PAIRS:
        start -= 1
    return text[start:end].lower()


def _next_visible(text: str, pos: int) -> str:
    """The first non-whitespace character at or after `pos`, or "" at the end."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return text[pos] if pos < len(text) else ""


def _period_continues(text: str, start: int, run: str, after: int) -> bool:
    """Whether the terminator run `run` at `start` is not a sentence end (abbreviation, initial, ...)."""
    following = _next_visible(text, after)
    if set(run) <= {".", "…"} and (len(run) > 1 or run == "…"):
        # an ellipsis: the sentence goes on before a lowercase letter
        return following.islower()
    if run != ".":
        return False
    word = _word_before(text, start)
    if word in ABBREVIATIONS:
        return True
    if word in _NUMBER_ABBREVIATIONS:
        return following.isdigit()
    if word in SOFT_ABBREVIATIONS:
        return not (following.isupper() or (following != "" and _is_cjk(following)))
    return len(word) == 1 and text[start - 1].isupper() and text[start - 1].isalpha()


class _Scanner:
    """One pass over the text collecting sentence ends, weak cut points and whitespace cuts."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.stack: list[str] = []  # the closers awaited, innermost last
        self.awaited: dict[str, int] = {}  # how many of each closer the stack holds (O(1) lookups)
        self.cuts: list[tuple[int, int]] = []  # (position, rank) before sentence lengths are known

    def _open_or_close(self, index: int) -> None:
        char, text = self.text[index], self.text
        if char == '"' and self.stack and self.stack[-1] == '"':
            self._pop_to('"')
        elif char == "’" and 0 < index < len(text) - 1 and text[index - 1].isalnum() and text[index + 1].isalnum():
            return  # an apostrophe: don’t
        elif char in _CLOSERS and char != '"':
            if self.awaited.get(char):
                self._pop_to(char)
        elif char in _PAIRS:
            if char == "‘" and index > 0 and text[index - 1].isalnum():
                return
            self.stack.append(_PAIRS[char])
            self.awaited[_PAIRS[char]] = self.awaited.get(_PAIRS[char], 0) + 1

    def _pop_to(self, closer: str) -> None:
        """Close the innermost span awaiting `closer` and any unclosed spans inside it."""
        while self.stack:
            popped = self.stack.pop()
            self.awaited[popped] -= 1
            if popped == closer:
                return

    def _closes(self, index: int) -> bool:
        char = self.text[index]
        return char in _CLOSERS and bool(self.awaited.get(char))

    def _terminator(self, start: int) -> int:
        """Handle the terminator run starting at `start`; return the index after it and its closers."""
        text = self.text
        end = start
        while end < len(text) and text[end] in _TERMINATORS:
            end += 1
        run = text[start:end]
        after = end
        while after < len(text) and self._closes(after):
            self._open_or_close(after)
            after += 1
        nxt = text[after] if after < len(text) else ""
        latin = all(char in _LATIN_TERMINATORS for char in run)
        if latin and nxt and not nxt.isspace() and not _is_cjk(nxt):
            return after
        if _period_continues(text, start, run, after):
            return after
        self.cuts.append((after, QUOTED_SENTENCE if self.stack else SENTENCE))
        return after

    def scan(self) -> list[tuple[int, int]]:
        text, index = self.text, 0
        while index < len(text):
            char = text[index]
            if char in _TERMINATORS:
                index = self._terminator(index)
                continue
            quoted = bool(self.stack)
            if char in _CJK_WEAK or (char in _LATIN_WEAK and (index + 1 == len(text) or text[index + 1].isspace())):
                self.cuts.append((index + 1, QUOTED_WEAK if quoted else WEAK))
            elif char.isspace() and index + 1 < len(text) and not text[index + 1].isspace():
                self.cuts.append((index + 1, QUOTED_SPACE if quoted else SPACE))
            self._open_or_close(index)
            index += 1
        return self.cuts


class _Measure:
    """Stripped lengths of slices of one text in constant time (a hostile text stays linear)."""

    def __init__(self, text: str) -> None:
        size = len(text)
        self.first_visible = [size] * (size + 1)  # the first non-space index at or after p
        self.visible_end = [0] * (size + 1)  # one past the last non-space index before p
        for pos in range(size - 1, -1, -1):
            self.first_visible[pos] = self.first_visible[pos + 1] if text[pos].isspace() else pos
        for pos in range(1, size + 1):
            self.visible_end[pos] = self.visible_end[pos - 1] if text[pos - 1].isspace() else pos

    def length(self, start: int, end: int) -> int:
        """``len(text[start:end].strip())``."""
        return max(0, self.visible_end[end] - self.first_visible[start])


def _scan(text: str, starts: list[int]) -> list[tuple[int, int]]:
    """The scanner's cut points that fall between grapheme clusters (not "。" + a combining mark)."""
    allowed = set(starts)
    allowed.add(len(text))
    return [(pos, rank) for pos, rank in _Scanner(text).scan() if pos in allowed]


def _cut_points(text: str, measure: _Measure) -> list[_Cut]:
    """Every cut point, sorted by position, each knowing its sentence's stripped length."""
    starts = _grapheme_starts(text)
    found = _scan(text, starts)
    ends = sorted({pos for pos, rank in found if rank == SENTENCE} | {len(text)})
    ranked: dict[int, int] = {}
    for pos, rank in found:
        ranked[pos] = min(rank, ranked.get(pos, HARD))
    for pos in starts:
        ranked.setdefault(pos, HARD)
    lengths = {end: measure.length(ends[at - 1] if at else 0, end) for at, end in enumerate(ends)}
    cuts: list[_Cut] = []
    for pos in sorted(ranked):
        if pos <= 0 or pos > len(text):
            continue
        if ranked[pos] == SENTENCE:
            cuts.append(_Cut(pos, SENTENCE, 0))
            continue
        cuts.append(_Cut(pos, ranked[pos], lengths[ends[bisect.bisect_left(ends, pos)]]))
    return cuts


def _next_cut(found: _Cuts, pos: int, limit: int, minimum: int, stop: int) -> int:
    """Where the piece starting at `pos` ends, at `stop` at the latest: see rule 4 in the module
    docstring."""
    measure, cuts, positions = found.measure, found.cuts, found.positions
    start = measure.first_visible[pos]
    high = min(start + limit, stop)
    high = min(measure.first_visible[high], stop)  # trailing whitespace is stripped: it does not count
    best: tuple[bool, int, int] | None = None
    at, end = bisect.bisect_right(positions, start), bisect.bisect_right(positions, high)
    while at < end:
        cut = cuts[at]
        if cut.rank != SENTENCE and cut.length <= limit:
            at = found.sentence_end[at]  # only a sentence longer than the limit is cut inside
            continue
        at += 1
        length = measure.length(start, cut.pos)
        if length == 0 or length > limit:
            continue
        key = (length >= minimum and cut.rank != HARD, -cut.rank, cut.pos)
        if best is None or key > best:
            best = key
    if best is not None:
        return best[2]
    return start + limit  # one grapheme cluster longer than the limit: cut inside it


def _validate(min_chars: int, max_chars: int, first_chars: int | None) -> None:
    for name, value in (("min_chars", min_chars), ("max_chars", max_chars), ("first_chars", first_chars)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if min_chars < 1:
        raise ValueError(f"min_chars must be at least 1, got {min_chars}")
    if max_chars < min_chars:
        raise ValueError(f"max_chars must be at least min_chars ({min_chars}), got {max_chars}")
    if first_chars is not None and not 1 <= first_chars <= max_chars:
        raise ValueError(f"first_chars must be between 1 and max_chars ({max_chars}), got {first_chars}")


def _checked(text: str, min_chars: int, max_chars: int, first_chars: int | None) -> str:
    _validate(min_chars, max_chars, first_chars)
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    return text


def split_spans(text: str, *, min_chars: int, max_chars: int, first_chars: int | None = None) -> list[tuple[int, int]]:
    """The pieces of :func:`split_text` as ``(start, end)`` slices of `text` (before stripping)."""
    cuts = _Cuts(_checked(text, min_chars, max_chars, first_chars))
    return cuts.pack(min_chars=min_chars, max_chars=max_chars, first_chars=first_chars)


class _Cuts:
    """A text's cut points, found once (the scan is the costly part), packed into pieces as often
    as asked (split_balanced packs one text under many limits)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.measure = _Measure(text)
        self.cuts = _cut_points(text, self.measure)
        self.positions = [cut.pos for cut in self.cuts]
        self.sentence_end = [len(self.cuts)] * len(self.cuts)  # per cut: the next sentence end's index
        for at in range(len(self.cuts) - 2, -1, -1):  # (the cuts inside a sentence share its length)
            self.sentence_end[at] = at + 1 if self.cuts[at + 1].rank == SENTENCE else self.sentence_end[at + 1]

    def pack(self, *, min_chars: int, max_chars: int, first_chars: int | None, begin: int = 0,
             stop: int | None = None) -> list[tuple[int, int]]:
        """The pieces of ``text[begin:stop]`` (the whole text by default; a region's ends must be
        cut points or the text's ends)."""
        text, measure = self.text, self.measure
        stop = len(text) if stop is None else stop
        spans: list[tuple[int, int]] = []
        limits: list[int] = []
        pos = begin
        while measure.first_visible[pos] < stop:
            first = not spans
            limit = first_chars if first and first_chars is not None else max_chars
            minimum = 1 if first and first_chars is not None else min_chars
            end = stop if measure.length(pos, stop) <= limit else _next_cut(self, pos, limit, minimum, stop)
            spans.append((pos, end))
            limits.append(limit)
            pos = end
        if len(spans) >= 2 and measure.length(*spans[-1]) < min_chars:
            merged = (spans[-2][0], spans[-1][1])
            if measure.length(*merged) <= limits[-2]:
                spans[-2:] = [merged]
        return spans

    def spans(self, limit: int, min_chars: int, begin: int, stop: int) -> list[tuple[int, int]]:
        """The pieces of ``text[begin:stop]``, each piece's limit ``limit`` (its minimum no higher)."""
        return self.pack(min_chars=min(min_chars, limit), max_chars=limit, first_chars=None, begin=begin, stop=stop)

    def strip(self, spans: Sequence[tuple[int, int]]) -> list[str]:
        return [self.text[start:end].strip() for start, end in spans]


def split_text(text: str, *, min_chars: int, max_chars: int, first_chars: int | None = None) -> list[str]:
    """Split `text` into stripped, non-empty pieces of at most `max_chars` characters, at sentence ends.

    The rules and the exact property kept are in the module docstring: pieces are consecutive slices
    of `text` separated only by whitespace (joining them with the whitespace the cuts fell on gives
    ``text.strip()`` back), the first piece is at most `first_chars` long when given, and each piece
    is at least `min_chars` long where whole sentences allow. Empty or whitespace-only text gives [].
    Raises ValueError naming the parameter when `min_chars` < 1, `max_chars` < `min_chars` or
    `first_chars` is outside [1, `max_chars`].
    """
    return [text[start:end].strip() for start, end in split_spans(
        text, min_chars=min_chars, max_chars=max_chars, first_chars=first_chars)]


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (rules 1 and 2 of the module docstring), stripped, empty ones dropped.

    Not used for packing, which needs cut positions; it shows (and tests pin) where sentences end.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    ends = [pos for pos, rank in _scan(text, _grapheme_starts(text)) if rank == SENTENCE]
    bounds = [0, *ends, len(text)]
    pieces = (text[start:end].strip() for start, end in itertools.pairwise(bounds))
    return [piece for piece in pieces if piece]


# --- Balanced over parallel slots (the sidecar's fan-out) ---------------------------------------


def split_balanced(text: str, *, lanes: int, min_chars: int, max_chars: int,
                   first_chars: int | None = None) -> list[str]:
    """``text`` cut at sentence ends into pieces of at most ``max_chars`` (the first at most
    ``first_chars`` when given), as few and as even as ``lanes`` parallel slots finish soonest:
    the smallest piece limit, but no less than ``min_chars``, that still cuts the text (after a
    first piece) into at most ``lanes`` pieces, found by bisection since a larger limit never needs
    more pieces. A text that needs more pieces than ``lanes`` even at ``max_chars`` gets
    ``max_chars`` pieces (the extra ones run as slots free up). Empty text gives []. Raises
    ValueError as split_text does, and for ``lanes`` < 1."""
    _check_count("lanes", lanes)
    cuts = _Cuts(_checked(text, min_chars, max_chars, first_chars))
    head = [] if first_chars is None else cuts.pack(min_chars=min_chars, max_chars=max_chars,
                                                    first_chars=first_chars)[:1]
    begin = head[0][1] if head else 0
    if first_chars is not None and (not head or cuts.measure.first_visible[begin] >= len(text)):
        return cuts.strip(head)
    return cuts.strip(head + _balanced(cuts, begin, len(text), lanes=lanes, min_chars=min_chars,
                                       max_chars=max_chars))


def split_tapered(text: str, *, lanes: int, per_lane: int, tail_share: float, min_chars: int,
                  max_chars: int) -> list[str]:
    """``text`` cut for ``lanes`` slots with noisy service times: the first ``1 - tail_share`` of it
    (to the sentence end nearest that share of its visible characters) balanced into ``lanes`` big
    pieces, one to start on each slot, the rest into ``lanes × (per_lane - 1)`` smaller ones that
    the slots finishing first take (decreasing sizes, as guided self-scheduling). Started longest
    first, the big pieces start first. With ``tail_share`` 0, ``per_lane`` 1, no sentence end, or a text
    needing more than ``lanes × per_lane`` pieces of ``max_chars``, it is ``split_balanced(text,
    lanes=lanes × per_lane, ...)``. Pieces keep split_text's properties but the first-piece rule.
    Raises ValueError as split_balanced does, and for ``per_lane`` < 1 or ``tail_share`` outside [0, 1)."""
    return even_and_tapered(text, lanes=lanes, per_lane=per_lane, tail_share=tail_share, min_chars=min_chars,
                            max_chars=max_chars)[1]


def even_and_tapered(text: str, *, lanes: int, per_lane: int, tail_share: float, min_chars: int,
                     max_chars: int) -> tuple[list[str], list[str]]:
    """``split_balanced(text, lanes=lanes × per_lane, ...)`` and split_tapered's cut, from one scan."""
    _check_count("lanes", lanes)
    _check_count("per_lane", per_lane)
    if isinstance(tail_share, bool) or not isinstance(tail_share, (int, float)) or not 0 <= tail_share < 1:
        raise ValueError(f"tail_share must be a number in [0, 1), got {tail_share!r}")
    cuts = _Cuts(_checked(text, min_chars, max_chars, None))
    even = cuts.strip(_balanced(cuts, 0, len(text), lanes=lanes * per_lane, min_chars=min_chars, max_chars=max_chars))
    if tail_share == 0 or per_lane == 1 or len(even) > lanes * per_lane:  # too long: no head to size a tail behind
        return even, even
    visible = cuts.measure.length(0, len(text))
    inside = [cut.pos for cut in cuts.cuts if cut.rank == SENTENCE and 0 < cuts.measure.length(0, cut.pos) < visible]
    if not inside:
        return even, even
    goal = (1 - tail_share) * visible
    stop = min(inside, key=lambda pos: (abs(cuts.measure.length(0, pos) - goal), pos))
    spans = _balanced(cuts, 0, stop, lanes=lanes, min_chars=min_chars, max_chars=max_chars)
    spans += _balanced(cuts, stop, len(text), lanes=lanes * (per_lane - 1), min_chars=min_chars, max_chars=max_chars)
    return even, cuts.strip(spans)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")


def _balanced(cuts: _Cuts, begin: int, stop: int, *, lanes: int, min_chars: int,
              max_chars: int) -> list[tuple[int, int]]:
    """``text[begin:stop]`` of ``cuts`` into at most ``lanes`` even pieces: see split_balanced."""
    visible = cuts.measure.length(begin, stop)
    # Never below ``min_chars``: a text too short to give each lane that much gets fewer pieces.
    low = min(max_chars, max(min_chars, math.ceil(visible / lanes)))
    best = cuts.spans(max_chars, min_chars, begin, stop)
    if not best or len(best) > lanes or low >= max_chars:
        return best  # nothing; or more pieces than lanes even at the most allowed: that is the least
    high = max_chars  # the smallest limit known to cut into at most ``lanes`` pieces
    while low < high:
        middle = (low + high) // 2
        spans = cuts.spans(middle, min_chars, begin, stop)
        if len(spans) <= lanes:
            high, best = middle, spans
        else:
            low = middle + 1
    return best


def longest_first(pieces: Sequence[str]) -> list[int]:
    """The indices of `pieces`, the longest to speak first (by :func:`glmtts.text.units`; equal
    ones in text order): the order to start pieces in when the answer is only whole once all are
    done. Slots that each take the next piece as they free up then finish closest together, the
    short pieces filling the gaps at the end (longest processing time first). With sentences as
    the unit, pieces are uneven (bench.fanout's report gives what either order allows)."""
    return sorted(range(len(pieces)), key=lambda index: (-units(pieces[index]), index))
