"""glmtts.audio.join_pcm: pieces of synthesized speech join without clicks, to the exact length.

The audio is the emulator's synthetic voice (glmtts.emulator.voice.render_speech, what the synthetic
engine answers), cut so that every piece starts and ends mid-tone at high amplitude: the worst case
for a join, and one where a raw concatenation does click -- which the tests show, so the bound they
hold the joins to is one a bad join breaks.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from glmtts.audio import (
    EDGE_FADE_S,
    FULL_SCALE,
    MAX_JOIN_S,
    JoinSteps,
    Pcm,
    crossfade_overlaps,
    decode_wav,
    join_offsets,
    join_pcm,
    join_steps,
)
from glmtts.emulator.voice import SECONDS_PER_UNIT, render_speech

RATES = (24000, 32000)  # what upstream writes
# How much a join's step may exceed the largest step inside the pieces: the fades' own contribution
# (a 5 ms raised cosine moves its gain by at most pi/2/121 per sample at 24 kHz, times at most a
# 12000 peak: ~160, 0.5% of full scale). A click from a raw join is a step of half full scale.
EPSILON = 0.01
MODES = {
    "plain": {},
    "pause": {"pause_s": 0.05},
    "crossfade": {"crossfade_s": 0.02},
}


def as_array(pcm: Pcm) -> npt.NDArray[np.int16]:
    return np.frombuffer(pcm.samples, dtype="<i2")


def pcm(samples: npt.ArrayLike, rate: int = 24000) -> Pcm:
    return Pcm(np.asarray(samples, dtype="<i2").tobytes(), rate)


def loud_piece(rate: int, seed: int, seconds: float = 0.8) -> Pcm:
    """Synthetic speech cut to start at its deepest trough and end at its highest crest, both in
    the middle of a tone: a join of two such pieces jumps across nearly twice the peak."""
    wav = render_speech(text=f"piece {seed}", units=seconds / SECONDS_PER_UNIT, sample_rate=rate,
                        seed=seed, duration_s=seconds)
    x = as_array(decode_wav(wav))
    half = len(x) // 2
    start = int(np.argmin(x[:half]))
    end = half + int(np.argmax(x[half:]))
    assert x[start] < -4000 and x[end] > 4000  # loud edges, or the test proves nothing
    return pcm(x[start:end + 1], rate)


def largest_step(pieces: list[Pcm]) -> float:
    """The largest sample-to-sample step inside any piece, as a fraction of full scale."""
    return max(int(np.abs(np.diff(as_array(p).astype(np.int32))).max()) for p in pieces) / FULL_SCALE


def transition(rate: int, mode: str) -> int:
    """Samples either side of a join offset that the join's fades, pause or overlap may touch."""
    kwargs = MODES[mode]
    return round((kwargs.get("pause_s", 0) + kwargs.get("crossfade_s", 0) + EDGE_FADE_S) * rate) + 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rate", RATES)
def test_joins_of_speech_do_not_click(rate: int, mode: str) -> None:
    pieces = [loud_piece(rate, seed) for seed in (1, 2, 3)]
    joined = join_pcm(pieces, **MODES[mode])
    steps = join_steps(joined, join_offsets(pieces, **MODES[mode]), transition(rate, mode))
    bound = largest_step(pieces) + EPSILON
    assert steps.at_joins <= bound, f"{mode} join steps {steps.at_joins:.3f} of full scale > {bound:.3f}"
    assert steps.elsewhere <= largest_step(pieces)  # away from the joins the audio is untouched


@pytest.mark.parametrize("rate", RATES)
def test_crossfade_clamped_by_a_short_piece_does_not_click(rate: int) -> None:
    # A crossfade longer than half the middle piece is clamped at both its joins, and only there.
    pieces = [loud_piece(rate, 8), loud_piece(rate, 9, seconds=0.25), loud_piece(rate, 10)]
    half = len(as_array(pieces[1])) // 2
    assert crossfade_overlaps(pieces, 0.2) == [half, half] and half < round(0.2 * rate)
    joined = join_pcm(pieces, crossfade_s=0.2)
    steps = join_steps(joined, join_offsets(pieces, crossfade_s=0.2), half + 2)
    bound = largest_step(pieces) + EPSILON
    assert steps.at_joins <= bound, f"clamped crossfade steps {steps.at_joins:.3f} of full scale > {bound:.3f}"
    assert steps.elsewhere <= largest_step(pieces)


@pytest.mark.parametrize("rate", RATES)
def test_raw_concatenation_of_the_same_pieces_breaks_the_bound(rate: int) -> None:
    pieces = [loud_piece(rate, seed) for seed in (1, 2, 3)]
    raw = pcm(np.concatenate([as_array(p) for p in pieces]), rate)
    steps = join_steps(raw, join_offsets(pieces), transition(rate, "plain"))
    assert steps.at_joins > largest_step(pieces) + EPSILON
    assert steps.at_joins > 3 * largest_step(pieces)  # a click: far beyond the voice's own steps
    assert steps.elsewhere <= largest_step(pieces)


@pytest.mark.parametrize("rate", RATES)
def test_joined_speech_duration_is_exact(rate: int) -> None:
    pieces = [loud_piece(rate, seed) for seed in (4, 5, 6, 7)]
    total = sum(len(as_array(p)) for p in pieces)
    assert len(as_array(join_pcm(pieces))) == total
    assert len(as_array(join_pcm(pieces, pause_s=0.25))) == total + 3 * round(0.25 * rate)
    assert len(as_array(join_pcm(pieces, crossfade_s=0.03))) == total - 3 * round(0.03 * rate)


def test_durations_to_the_sample() -> None:
    pieces = [pcm(np.full(n, 1000), 24000) for n in (1000, 2000, 1500)]
    assert len(as_array(join_pcm(pieces))) == 4500
    assert len(as_array(join_pcm(pieces, crossfade_s=0.01))) == 4500 - 2 * 240
    assert len(as_array(join_pcm(pieces, pause_s=0.1))) == 4500 + 2 * 2400
    # A crossfade longer than a piece allows is clamped at each join to half of either piece:
    # 1000|2000 to 500, 2000|1500 to 750.
    assert crossfade_overlaps(pieces, 1.0) == [500, 750]
    assert crossfade_overlaps(pieces, 0.01) == [240, 240]
    assert crossfade_overlaps(pieces, 0.0) == [0, 0]
    assert len(as_array(join_pcm(pieces, crossfade_s=1.0))) == 4500 - 500 - 750
    assert join_offsets(pieces, crossfade_s=1.0) == [500, 1750]
    assert join_offsets(pieces, pause_s=0.1) == [3400, 7800]
    assert crossfade_overlaps(pieces[:1], 1.0) == [] and join_offsets(pieces[:1]) == []


def test_pause_is_silence_between_faded_edges() -> None:
    a, b = pcm(np.full(2400, 8000)), pcm(np.full(2400, -8000))
    out = as_array(join_pcm([a, b], pause_s=0.1))
    edge = round(EDGE_FADE_S * 24000)
    assert np.all(out[2400:4800] == 0)
    assert np.all(out[:2400 - edge] == 8000) and np.all(out[4800 + edge:] == -8000)
    fade_out = out[2400 - edge:2400]
    assert np.all(np.diff(fade_out) < 0) and 0 < fade_out[-1] < 100  # falls smoothly to near 0


def test_one_piece_is_returned_as_is() -> None:
    piece = pcm(np.array([32767, -32768, 5]))
    assert join_pcm([piece], crossfade_s=0.01) is piece
    assert join_pcm([piece], pause_s=0.01) is piece


def test_outer_edges_are_not_faded() -> None:
    pieces = [pcm(np.full(1000, 9000)), pcm(np.full(1000, -9000))]
    for kwargs in MODES.values():
        out = as_array(join_pcm(pieces, **kwargs))
        assert out[0] == 9000 and out[-1] == -9000


def test_mixed_rates_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="24000, 32000 Hz"):
        join_pcm([pcm(np.zeros(10), 32000), pcm(np.zeros(10), 24000)])


@pytest.mark.parametrize(
    ("pieces", "kwargs", "message"),
    [
        ([], {}, "no pieces"),
        ("ab", {}, "not Pcm"),
        (None, {}, "sequence of Pcm"),
        ([b"\0\0"], {}, "piece 0 is a bytes"),
        ([pcm(np.zeros(10))] * 2, {"crossfade_s": 0.01, "pause_s": 0.01}, "not both"),
        ([pcm(np.zeros(10))] * 2, {"crossfade_s": -0.01}, "crossfade_s must be between"),
        ([pcm(np.zeros(10))] * 2, {"pause_s": math.nan}, "pause_s must be between"),
        ([pcm(np.zeros(10))] * 2, {"pause_s": math.inf}, "pause_s must be between"),
        ([pcm(np.zeros(10))] * 2, {"pause_s": MAX_JOIN_S * 2}, "pause_s must be between"),
        ([pcm(np.zeros(10))] * 2, {"crossfade_s": True}, "crossfade_s must be a number"),
        ([pcm(np.zeros(10))] * 2, {"pause_s": "1"}, "pause_s must be a number"),
    ],
)
def test_bad_input_is_refused(pieces: object, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        join_pcm(pieces, **kwargs)  # type: ignore[arg-type]


def test_join_steps_finds_a_click_and_refuses_bad_joins() -> None:
    clicky = pcm(np.array([0, 10, 20, 16000, 16010, 16020]))
    assert join_steps(clicky, [3], 0) == JoinSteps(at_joins=15980 / FULL_SCALE, elsewhere=10 / FULL_SCALE)
    assert join_steps(clicky, [], 2).at_joins == 0
    with pytest.raises(ValueError, match="window"):
        join_steps(clicky, [3], -1)
    with pytest.raises(ValueError, match="outside the audio"):
        join_steps(clicky, [7], 1)


samples = arrays(np.int16, st.integers(0, 300), elements=st.integers(-32768, 32767))
modes = st.one_of(
    st.just({}),
    st.builds(lambda s: {"pause_s": s}, st.floats(0, 0.02)),
    st.builds(lambda s: {"crossfade_s": s}, st.floats(0, 0.02)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(samples, min_size=1, max_size=4), st.sampled_from(RATES), modes)
def test_random_pieces_keep_length_and_never_wrap(
    xs: list[npt.NDArray[np.int16]], rate: int, kwargs: dict[str, float]
) -> None:
    pieces = [pcm(x, rate) for x in xs]
    out = as_array(join_pcm(pieces, **kwargs)).astype(np.int32)
    n, total = len(xs), sum(len(x) for x in xs)
    overlaps = crossfade_overlaps(pieces, kwargs.get("crossfade_s", 0))
    gap = round(kwargs.get("pause_s", 0) * rate)
    assert len(out) == total - sum(overlaps) + (n - 1) * gap
    for a, b, overlap in zip(xs, xs[1:], overlaps, strict=False):
        assert overlap <= len(a) // 2 and overlap <= len(b) // 2  # head and tail overlaps never meet
    starts = [0, *join_offsets(pieces, **kwargs)]
    for i, (x, at) in enumerate(zip(xs, starts, strict=True)):
        x32 = x.astype(np.int32)
        got = out[at:at + len(x)]
        head = overlaps[i - 1] if i else 0  # samples mixed with the previous piece's tail
        tail = overlaps[i] if i < n - 1 else 0  # and with the next piece's head
        if kwargs.get("crossfade_s", 0) and round(kwargs["crossfade_s"] * rate):
            # Each output sample lies between the two inputs it mixes: no overshoot, no wrap.
            other = np.zeros_like(x32)
            if head:
                other[:head] = xs[i - 1][len(xs[i - 1]) - head:]
            if tail:
                other[len(x) - tail:] = xs[i + 1][:tail]
            mixed = np.zeros(len(x), dtype=bool)
            mixed[:head] = True
            mixed[len(x) - tail:] = True
            assert np.all(got[~mixed] == x32[~mixed])
            lo, hi = np.minimum(x32, other), np.maximum(x32, other)
            assert np.all((got[mixed] >= lo[mixed]) & (got[mixed] <= hi[mixed]))
        else:  # a fade only shrinks a sample towards 0, never flips its sign
            assert np.all(np.abs(got) <= np.abs(x32))
            assert np.all(got * x32 >= 0)
            if i < n - 1:
                assert np.all(out[at + len(x):at + len(x) + gap] == 0)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-32768, 32767),
    st.integers(1, 600),
    st.integers(1, 600),
    st.sampled_from(RATES),
    st.floats(0.001, 0.05),  # > 0: with 0 it is a plain join, whose edge fades do dip a constant
)
def test_crossfade_of_a_constant_stays_constant(value: int, a: int, b: int, rate: int, seconds: float) -> None:
    # The gains sum to 1 at every sample (the documented non-equal-power choice): a constant passes
    # unchanged, even at full scale, where equal-power gains would swell it by up to 3 dB and clip.
    out = as_array(join_pcm([pcm(np.full(a, value), rate), pcm(np.full(b, value), rate)], crossfade_s=seconds))
    assert np.all(np.abs(out.astype(np.int32) - value) <= 1)
