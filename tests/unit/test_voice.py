from __future__ import annotations

import array
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmtts.emulator.voice import (
    LEAD_SECONDS,
    MIN_SECONDS,
    SECONDS_PER_UNIT,
    render_speech,
    speech_seconds,
)
from glmtts.text import units
from glmtts.wav import read_wav

RATES = [24000, 32000]


def samples(wav: bytes) -> array.array[int]:
    out = array.array("h", read_wav(wav).pcm)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def test_speech_seconds() -> None:
    assert SECONDS_PER_UNIT == 0.22
    assert speech_seconds(0) == MIN_SECONDS
    assert speech_seconds(100) == pytest.approx(2 * LEAD_SECONDS + 22.0)
    assert speech_seconds(-5) == MIN_SECONDS


@given(st.floats(0, 1000))
def test_speech_seconds_is_monotonic_with_a_floor(u: float) -> None:
    assert MIN_SECONDS <= speech_seconds(u) <= speech_seconds(u + 1)


@pytest.mark.parametrize("sample_rate", RATES)
@pytest.mark.parametrize("text", ["你好，世界。", "Hello there, how are you today?", "", "一" * 300])
def test_duration_follows_units(text: str, sample_rate: int) -> None:
    u = units(text)
    audio = read_wav(render_speech(text=text, units=u, sample_rate=sample_rate, seed=1))
    assert (audio.sample_rate, audio.channels, audio.sample_width) == (sample_rate, 1, 2)
    assert abs(audio.duration - speech_seconds(u)) <= 1 / sample_rate


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 30), st.sampled_from(RATES), st.integers(-(2**63), 2**63))
def test_explicit_duration_wins(seconds: float, sample_rate: int, seed: int) -> None:
    wav = render_speech(text="abc", units=1000, sample_rate=sample_rate, seed=seed, duration_s=seconds)
    assert abs(read_wav(wav).duration - seconds) <= 1 / sample_rate


@pytest.mark.parametrize("sample_rate", RATES)
def test_deterministic(sample_rate: int) -> None:
    first = render_speech(text="今天天气很好", units=6.0, sample_rate=sample_rate, seed=42)
    assert render_speech(text="今天天气很好", units=6.0, sample_rate=sample_rate, seed=42) == first


@pytest.mark.parametrize("sample_rate", RATES)
def test_seed_and_text_change_the_audio(sample_rate: int) -> None:
    base = render_speech(text="今天天气很好", units=6.0, sample_rate=sample_rate, seed=42)
    other_seed = render_speech(text="今天天气很好", units=6.0, sample_rate=sample_rate, seed=43)
    other_text = render_speech(text="今天天气不好", units=6.0, sample_rate=sample_rate, seed=42)
    assert len(base) == len(other_seed) == len(other_text)
    assert base != other_seed
    assert base != other_text
    assert other_seed != other_text


@pytest.mark.parametrize("sample_rate", RATES)
def test_sounds_like_syllables(sample_rate: int) -> None:
    pcm = samples(render_speech(text="x", units=20.0, sample_rate=sample_rate, seed=7))
    lead = round(LEAD_SECONDS * sample_rate)
    assert not any(pcm[:lead]) and not any(pcm[-lead:])  # silent lead-in and lead-out
    assert 3000 < max(pcm) < 32767 and min(pcm) > -32768  # audible, not clipped
    # Voiced stretches separated by silent gaps: count the starts of voiced runs.
    voiced = [s != 0 for s in pcm]
    runs = [i for i in range(1, len(voiced)) if voiced[i] and not any(voiced[max(0, i - 40) : i])]
    assert 15 <= len(runs) <= 25


def test_pitch_differs_between_syllables() -> None:
    pcm = samples(render_speech(text="x", units=20.0, sample_rate=24000, seed=3))
    slot = round(SECONDS_PER_UNIT * 24000)
    start = round(LEAD_SECONDS * 24000)
    # Each syllable's period is the distance between its first two upward zero crossings.
    periods = set()
    for k in range(10):
        seg = pcm[start + k * slot : start + (k + 1) * slot]
        ups = [i for i in range(1, len(seg)) if seg[i - 1] < 0 <= seg[i]]
        periods.add(ups[1] - ups[0])
    assert len(periods) > 3


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        render_speech(text="a", units=1.0, sample_rate=0, seed=0)
    with pytest.raises(ValueError):
        render_speech(text="a", units=1.0, sample_rate=24000, seed=0, duration_s=-1.0)


def test_odd_text_is_fine() -> None:
    wav = render_speech(text="\ud800 lone surrogate \x00", units=3.0, sample_rate=24000, seed=0)
    assert read_wav(wav).frames > 0
