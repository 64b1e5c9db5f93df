"""glmtts.split: sentence splitting for fanning a long text out across backends (issue 17)."""

from __future__ import annotations

import itertools
import re
import time
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmtts.split import _grapheme_starts, longest_first, split_sentences, split_spans, split_text
from glmtts.text import units

# (text, min_chars, max_chars, first_chars, expected pieces)
TABLE: list[tuple[str, int, int, int | None, list[str]]] = [
    # Chinese news: whole sentences, commas and decimals inside them stay.
    ("据新华社报道，今年全国粮食总产量达到6.95亿吨，再创历史新高。专家表示，这得益于良种推广和高标准农田建设。"
     "下一步，农业部门将继续加强防灾减灾工作。", 10, 40, None,
     ["据新华社报道，今年全国粮食总产量达到6.95亿吨，再创历史新高。", "专家表示，这得益于良种推广和高标准农田建设。",
      "下一步，农业部门将继续加强防灾减灾工作。"]),
    # Chinese dialogue: a terminator inside “…” is no sentence end; the closing quote stays with it.
    ("“你今天去哪儿了？”妈妈问。“我去图书馆了。”小明回答。“借了什么书？”“一本科幻小说。”", 5, 20, None,
     ["“你今天去哪儿了？”妈妈问。", "“我去图书馆了。”小明回答。", "“借了什么书？”“一本科幻小说。”"]),
    # A quoted span longer than max_chars is cut inside, at its own sentence ends first.
    ("他大声喊道：「快跑！后面有人追来了！我们必须在天黑之前赶到山下的村子，否则就来不及了！」", 5, 20, None,
     ["他大声喊道：「快跑！后面有人追来了！", "我们必须在天黑之前赶到山下的村子，", "否则就来不及了！」"]),
    ("He said “Stop. Don't go.” Then he left. She stayed.", 5, 30, None,
     ["He said “Stop. Don't go.”", "Then he left. She stayed."]),
    # Abbreviations: Fig./No. before a digit, but "no." ends a sentence.
    ("The results (see Fig. 3 and No. 7) were clear. I said no. Then we left.", 5, 50, None,
     ["The results (see Fig. 3 and No. 7) were clear.", "I said no. Then we left."]),
    ("Prices rose 3.5% in Q1, e.g. for food, i.e. most items. Inflation hit 4.2 percent.", 5, 60, None,
     ["Prices rose 3.5% in Q1, e.g. for food, i.e. most items.", "Inflation hit 4.2 percent."]),
    # Titles, initials, decimals, a.m./p.m. before lowercase, versions, URLs, ellipsis before lowercase.
    ("Mr. Smith met Dr. J. R. R. Tolkien at 3.14 p.m. on v1.2.3. See https://example.com/a.b now. "
     "Wait... what? Yes! OK.", 10, 40, None,
     ["Mr. Smith met Dr. J. R. R. Tolkien at", "3.14 p.m. on v1.2.3.", "See https://example.com/a.b now.",
      "Wait... what? Yes! OK."]),
    ("Contact me at john.doe@example.com. Or visit https://www.example.org/docs/v2.1/index.html. Thanks!",
     5, 60, None,
     ["Contact me at john.doe@example.com.", "Or visit https://www.example.org/docs/v2.1/index.html.", "Thanks!"]),
    # Soft abbreviations end a sentence before a capital letter only.
    ("We met at 9 a.m. sharp. The bus left at 5 p.m. The trip was long, etc. Everyone was tired.", 5, 30, None,
     ["We met at 9 a.m. sharp.", "The bus left at 5 p.m.", "The trip was long, etc.", "Everyone was tired."]),
    ("The U.S. economy grew. Mrs. Brown agreed; Prof. Lee did not.", 5, 30, None,
     ["The U.S. economy grew.", "Mrs. Brown agreed;", "Prof. Lee did not."]),
    ("Version 1.2.3 is out! Upgrade now; it fixes bugs.", 5, 25, None,
     ["Version 1.2.3 is out!", "Upgrade now;", "it fixes bugs."]),
    ("Wait... what? He paused... Then he spoke.", 3, 20, None, ["Wait... what?", "He paused...", "Then he spoke."]),
    ("(This is a parenthetical remark. It has two sentences.) After it, more text follows.", 5, 60, None,
     ["(This is a parenthetical remark. It has two sentences.)", "After it, more text follows."]),
    ("«Bonjour. Ça va?» dit-il. «Oui.»", 3, 20, None, ["«Bonjour. Ça va?»", "dit-il. «Oui.»"]),
    # Mixed Chinese and English: a Latin period before CJK ends a sentence; no space is invented.
    ("我们使用Python 3.11和PyTorch 2.1进行训练。The model achieves 95.3% accuracy. 效果非常好！", 5, 40, None,
     ["我们使用Python 3.11和PyTorch 2.1进行训练。", "The model achieves 95.3% accuracy.", "效果非常好！"]),
    ("北京时间12月5日，（记者张三报道。）会议在北京举行。", 3, 15, None,
     ["北京时间12月5日，", "（记者张三报道。）", "会议在北京举行。"]),
    # No punctuation at all: hard cuts at max_chars; the short tail cannot join a full piece.
    ("这是一段没有任何标点符号的很长的文字我们需要把它切开才能送去合成", 5, 10, None,
     ["这是一段没有任何标点", "符号的很长的文字我们", "需要把它切开才能送去", "合成"]),
    # The first piece: whole sentences within first_chars; the rest packed up to max_chars.
    ("第一句。第二句。第三句。第四句。第五句。", 5, 10, 4, ["第一句。", "第二句。第三句。", "第四句。第五句。"]),
    ("Hello there. General Kenobi! You are a bold one.", 1, 100, 13,
     ["Hello there.", "General Kenobi! You are a bold one."]),
    # A first sentence longer than first_chars is cut like an over-long one; an ellipsis before CJK ends one.
    ("这一天……他终于回来了。", 1, 100, 5, ["这一天……", "他终于回来了。"]),
    ("我们今天上午，在会议室里开了一个很长的会。", 1, 100, 8, ["我们今天上午，", "在会议室里开了一个很长的会。"]),
    # A short sentence before an over-long one is topped up from its first clause, never hard-cut.
    ("短。这是一个比较长的句子，包含逗号，需要切分。", 6, 12, None,
     ["短。", "这是一个比较长的句子，", "包含逗号，需要切分。"]),
    ("Hi. This sentence is rather long, and it has a comma in the middle of it.", 10, 40, None,
     ["Hi. This sentence is rather long,", "and it has a comma in the middle of it."]),
    # A short tail joins the piece before when that stays within max_chars.
    ("这是第一句话，比较长。好。", 8, 20, None, ["这是第一句话，比较长。好。"]),
    # Emoji (with a skin-tone modifier) and combining marks stay with their base characters.
    ("今天好开心😀！我们去吃火锅🍲吧？好的👍🏽。", 3, 10, None, ["今天好开心😀！", "我们去吃火锅🍲吧？", "好的👍🏽。"]),
    ("Ça va? Très bien. Nai\u0308ve cafe\u0301s are nice.", 3, 12, None,
     ["Ça va?", "Très bien.", "Nai\u0308ve", "cafe\u0301s are", "nice."]),
    ("e\u0301e\u0301e\u0301e\u0301e\u0301", 1, 3, None, ["e\u0301", "e\u0301", "e\u0301", "e\u0301", "e\u0301"]),
    ("🇨🇳🇺🇸🇯🇵", 1, 3, None, ["🇨🇳", "🇺🇸", "🇯🇵"]),
    # A mark on a punctuation character keeps the cut after it ("，" + U+0301 is one cluster).
    ("0000000，\u0301", 1, 2, None, ["00", "00", "00", "0", "，\u0301"]),
    ("  \n\t ", 1, 10, None, []),
    ("", 1, 10, None, []),
]


@pytest.mark.parametrize(("text", "low", "high", "first", "expected"), TABLE)
def test_table(text: str, low: int, high: int, first: int | None, expected: list[str]) -> None:
    pieces = split_text(text, min_chars=low, max_chars=high, first_chars=first)
    assert pieces == expected
    check_invariants(text, pieces, low, high, first)


SENTENCES: list[tuple[str, list[str]]] = [
    ("Mr. Smith met Mrs. Jones and Dr. Who. They talked.", ["Mr. Smith met Mrs. Jones and Dr. Who.", "They talked."]),
    ("MR. BIG, Prof. X, St. Louis vs. Boston. Done.", ["MR. BIG, Prof. X, St. Louis vs. Boston.", "Done."]),
    ("Use tools, e.g. hammers, i.e. heavy ones. Fine.", ["Use tools, e.g. hammers, i.e. heavy ones.", "Fine."]),
    ("J. R. R. Tolkien wrote it. It sold.", ["J. R. R. Tolkien wrote it.", "It sold."]),
    ("See No. 5 and Fig. 2. I said no. Ok.", ["See No. 5 and Fig. 2.", "I said no.", "Ok."]),
    ("Pi is 3.14159. Version v1.2.3 ships. Mail a.b@c.org. Go to https://x.org/a.b?c=1. End.",
     ["Pi is 3.14159.", "Version v1.2.3 ships.", "Mail a.b@c.org.", "Go to https://x.org/a.b?c=1.", "End."]),
    ("At 5 p.m. sharp. At 5 p.m. The end, etc. and more etc. Next.",
     ["At 5 p.m. sharp.", "At 5 p.m.", "The end, etc. and more etc.", "Next."]),
    ("Wait... what? Then… nothing. Stop... Go!", ["Wait... what?", "Then… nothing.", "Stop...", "Go!"]),
    ("Really?! Yes!! no; maybe.", ["Really?!", "Yes!!", "no;", "maybe."]),
    ("他说：“走吧。”她没动。", ["他说：“走吧。”", "她没动。"]),
    ("「好！」『行。』（注：略。）完。", ["「好！」", "『行。』", "（注：略。）", "完。"]),
    ("（括号里，没有句号）之后。", ["（括号里，没有句号）之后。"]),
    ("He said \"Go. Now.\" She went.", ["He said \"Go. Now.\"", "She went."]),
    ("It’s Tom’s. ‘Fine.’ Ok.", ["It’s Tom’s.", "‘Fine.’", "Ok."]),
    ("‘It’s done. Go.’ Ok.", ["‘It’s done. Go.’", "Ok."]),
    ("未闭合的“引号。后面。", ["未闭合的“引号。后面。"]),
    ("等等……他来了！真的？！", ["等等……", "他来了！", "真的？！"]),
    ("Hello.世界。OK!好", ["Hello.", "世界。", "OK!", "好"]),
]


@pytest.mark.parametrize(("text", "expected"), SENTENCES)
def test_sentence_ends(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_whole_text_within_max_is_one_piece() -> None:
    text = "Short text. Two sentences."
    assert split_text(text, min_chars=1, max_chars=100) == [text]
    assert split_text(f"  {text}\n", min_chars=1, max_chars=100) == [text]


def test_spans_are_the_pieces_before_stripping() -> None:
    text = "  第一句。 第二句！\n第三句？  "
    spans = split_spans(text, min_chars=1, max_chars=4)
    assert [text[a:b].strip() for a, b in spans] == split_text(text, min_chars=1, max_chars=4)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(left[1] == right[0] for left, right in itertools.pairwise(spans))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"min_chars": 0, "max_chars": 10}, "min_chars"),
    ({"min_chars": -5, "max_chars": 10}, "min_chars"),
    ({"min_chars": 5, "max_chars": 4}, "max_chars"),
    ({"min_chars": 1, "max_chars": 10, "first_chars": 0}, "first_chars"),
    ({"min_chars": 1, "max_chars": 10, "first_chars": 11}, "first_chars"),
    ({"min_chars": True, "max_chars": 10}, "min_chars"),
    ({"min_chars": 1, "max_chars": 10.5}, "max_chars"),
    ({"min_chars": 1, "max_chars": 10, "first_chars": "3"}, "first_chars"),
])
def test_bad_parameters_are_named(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        split_text("text.", **kwargs)  # type: ignore[arg-type]


def test_text_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="text"):
        split_text(b"bytes", min_chars=1, max_chars=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [
    "(" * 40000 + ")" * 40000, "x.中" * 30000, "中" * 120000, "a " * 60000, "。" * 100000, '"' * 100000,
    "\u0301" * 50000, " " * 100000 + "a",
])
def test_hostile_text_is_linear(text: str) -> None:
    """Deep brackets, endless terminators or no cut point at all must not go quadratic."""
    started = time.perf_counter()
    for high in (1, 7, 5000):
        pieces = split_text(text, min_chars=1, max_chars=high)
        assert all(0 < len(piece) <= high for piece in pieces)
    assert time.perf_counter() - started < 20


# ---- properties over arbitrary text ----

def check_invariants(text: str, pieces: list[str], low: int, high: int, first: int | None) -> None:
    """The property documented in glmtts.split: non-empty stripped pieces within their limit, met in
    order when walking `text` and skipping whitespace; joining with " " where whitespace was cut and
    "" where none was gives back the normalized text."""
    assert all(piece and piece == piece.strip() for piece in pieces)
    assert all(len(piece) <= high for piece in pieces)
    if pieces and first is not None:
        assert len(pieces[0]) <= first
    pos, joined, touching, at = 0, "", [], []
    for piece in pieces:
        start = pos
        while pos < len(text) and text[pos].isspace():
            pos += 1
        assert text.startswith(piece, pos), (piece, text[pos:pos + len(piece)])
        joined += (" " if joined and pos > start else "") + piece
        touching.append(pos == start)  # no whitespace between this piece and the one before
        at.append(pos)
        pos += len(piece)
    assert text[pos:].strip() == ""
    assert normalize(joined) == normalize(text)
    starts = cluster_starts(text)
    for i in range(1, len(pieces)):
        if touching[i] and at[i] not in starts:
            # a cut inside a grapheme cluster: only in a cluster longer than the piece before may hold
            cluster_start = max(p for p in starts if p < at[i])
            cluster_end = min([p for p in starts if p > at[i]] + [len(text)])
            limit = first if i == 1 and first is not None else high
            assert cluster_end - cluster_start > limit, (pieces[i - 1], pieces[i])
    if not any(char.isspace() for char in text):
        assert "".join(pieces) == text  # no space invented inside CJK


def joined_to(prev: str, char: str) -> bool:
    """Whether `char` belongs to the grapheme cluster of `prev` (marks, ZWJ sequences, skin tones,
    variation selectors); regional indicators pair up by position, which `cluster_starts` handles."""
    code = ord(char)
    return unicodedata.category(char).startswith("M") or "\u200d" in (prev, char) \
        or 0x1F3FB <= code <= 0x1F3FF or 0xFE00 <= code <= 0xFE0F or 0xE0020 <= code <= 0xE007F


def cluster_starts(text: str) -> set[int]:
    """Where grapheme clusters start (an oracle for the tests): after a mark-free boundary, and a
    regional indicator starts one only at an even position in its run (flags are pairs)."""
    starts, run = {0}, 0
    for index in range(1, len(text)):
        prev, char = text[index - 1], text[index]
        run = run + 1 if 0x1F1E6 <= ord(prev) <= 0x1F1FF else 0
        paired = 0x1F1E6 <= ord(char) <= 0x1F1FF and run % 2 == 1
        if not paired and not joined_to(prev, char):
            starts.add(index)
    return starts


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


ALPHABET = (
    "中文汉字我们的是了一他说好天" "abcXYZ" "0123" " \t\n\u3000"
    "。！？；…，、：" ".!?;,:" "“”‘’「」『』\"«»()（）" "😀👍🏽\u200d\U0001F1E8\U0001F1F3" "e\u0301\u0308"
)
# No cut point but grapheme boundaries: hard cuts, which must keep clusters whole.
CLUSTERS = "中文ae\u0301\u0308😀\u200d👍\U0001F3FD\U0001F1E8\U0001F1F3"
texts = st.one_of(st.text(alphabet=st.sampled_from(ALPHABET), max_size=300), st.text(max_size=100),
                  st.text(alphabet=st.sampled_from(CLUSTERS), max_size=100))


@st.composite
def limits(draw: st.DrawFn) -> tuple[int, int, int | None]:
    low = draw(st.integers(1, 40))
    high = draw(st.integers(low, 80))
    first = draw(st.one_of(st.none(), st.integers(1, high)))
    return low, high, first


@settings(max_examples=400, deadline=None)
@given(texts, limits())
def test_split_properties(text: str, bounds: tuple[int, int, int | None]) -> None:
    low, high, first = bounds
    pieces = split_text(text, min_chars=low, max_chars=high, first_chars=first)
    check_invariants(text, pieces, low, high, first)
    assert split_text(text, min_chars=low, max_chars=high, first_chars=first) == pieces  # deterministic
    assert (pieces == []) == (text.strip() == "")


SENTENCE_CHARS = st.text(alphabet=st.sampled_from("中文汉字我们的是了一他说好天"), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(SENTENCE_CHARS, min_size=1, max_size=20), st.integers(1, 31), st.integers(0, 40))
def test_whole_sentences_are_packed(bodies: list[str], low: int, extra: int) -> None:
    """Sentences within max_chars are never cut, and a piece ends only where the next sentence
    would not fit (greedy packing)."""
    high = max(low, 31) + extra
    sentences = [body + "。" for body in bodies]
    pieces = split_text("".join(sentences), min_chars=low, max_chars=high)
    assert "".join(pieces) == "".join(sentences)
    ends = {sum(len(s) for s in sentences[:i + 1]) for i in range(len(sentences))}
    offset = 0
    for index, piece in enumerate(pieces):
        offset += len(piece)
        assert offset in ends  # a whole number of sentences
        if index + 1 < len(pieces):
            assert len(piece) + len(sentences_from(sentences, offset)[0]) > high


def sentences_from(sentences: list[str], offset: int) -> list[str]:
    total = 0
    for index, sentence in enumerate(sentences):
        if total == offset:
            return sentences[index:]
        total += len(sentence)
    return []


# --- the order pieces start in ------------------------------------------------------------------


def test_longest_first_orders_by_speaking_length_not_characters() -> None:
    # By units (time to speak), not characters: "2026 年。" (7 characters) outlasts "Hi there." (9).
    pieces = ["Hi there.", "A much longer sentence here.", "2026 年。", "Hi there.", "短句。"]
    order = longest_first(pieces)
    assert order == sorted(range(len(pieces)), key=lambda i: (-units(pieces[i]), i))
    assert order[0] == 1 and order.index(0) < order.index(3)  # the two "Hi there." in text order
    assert units("2026 年。") > units("Hi there.") and order == [1, 2, 0, 3, 4]
    assert longest_first([]) == []


@given(st.lists(st.text(max_size=40), max_size=12))
def test_longest_first_is_a_permutation_longest_to_shortest(pieces: list[str]) -> None:
    order = longest_first(pieces)
    assert sorted(order) == list(range(len(pieces)))
    for a, b in itertools.pairwise(order):
        assert units(pieces[a]) > units(pieces[b]) or (units(pieces[a]) == units(pieces[b]) and a < b)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab .!\r\n"), max_size=40))
def test_ascii_text_takes_a_fast_path_to_the_same_grapheme_starts(text: str) -> None:
    fast = _grapheme_starts(text)
    assert fast == [i for i in range(1, len(text)) if text[i - 1:i + 1] != "\r\n"]
    # The general path (any non-ASCII character) agrees on the ASCII part.
    assert _grapheme_starts(text + "é")[:len(fast)] == fast
