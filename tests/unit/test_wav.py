from __future__ import annotations

import contextlib
import io
import struct
import wave

import pytest
from hypothesis import given
from hypothesis import strategies as st

from glmtts.wav import (
    WavAudio,
    WavError,
    concat,
    duration,
    from_base64,
    read_wav,
    to_base64,
    write_wav,
)


def pcm_of(*samples: int) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def stdlib_wav(pcm: bytes, *, sample_rate: int = 24000, channels: int = 1, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return out.getvalue()


@given(st.lists(st.integers(-32768, 32767), max_size=500), st.sampled_from([8000, 24000, 32000, 44100]))
def test_write_read_round_trip(samples: list[int], sample_rate: int) -> None:
    pcm = pcm_of(*samples)
    audio = read_wav(write_wav(pcm, sample_rate))
    assert audio == WavAudio(
        sample_rate=sample_rate, channels=1, sample_width=2, frames=len(samples), pcm=pcm
    )


def test_writes_a_standard_mono_16_bit_file() -> None:
    data = write_wav(pcm_of(1, -1, 32767, -32768), 24000)
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert len(data) == 44 + 8
    with wave.open(io.BytesIO(data), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 24000, 4)
        assert w.readframes(4) == pcm_of(1, -1, 32767, -32768)


def test_empty_pcm_is_a_valid_empty_file() -> None:
    audio = read_wav(write_wav(b"", 32000))
    assert audio.frames == 0 and audio.duration == 0.0 and audio.pcm == b""


@pytest.mark.parametrize(("pcm", "sample_rate"), [(b"\x00", 24000), (b"", 0), (b"\x00\x00", -1)])
def test_write_rejects_bad_input(pcm: bytes, sample_rate: int) -> None:
    with pytest.raises(WavError):
        write_wav(pcm, sample_rate)


@pytest.mark.parametrize(
    ("frames", "sample_rate", "seconds"), [(24000, 24000, 1.0), (16000, 32000, 0.5), (0, 24000, 0)]
)
def test_duration(frames: int, sample_rate: int, seconds: float) -> None:
    data = write_wav(bytes(2 * frames), sample_rate)
    assert duration(data) == seconds
    assert read_wav(data).duration == seconds


def test_reads_stereo() -> None:
    audio = read_wav(stdlib_wav(pcm_of(1, 2, 3, 4), channels=2))
    assert (audio.channels, audio.frames, audio.pcm) == (2, 2, pcm_of(1, 2, 3, 4))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"RIFF",
        b"RIFF\x00\x00\x00\x00WAVE",
        b"\x00" * 100,
        b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x03\x00\x01\x00\xc0]\x00\x00\x00w\x01\x00\x04\x00 \x00",
        b"ID3\x03\x00" + b"\x00" * 200,
    ],
    ids=["empty", "text", "riff-only", "no-chunks", "zeros", "float-format", "mp3"],
)
def test_garbage_raises_wav_error(data: bytes) -> None:
    with pytest.raises(WavError):
        read_wav(data)


@pytest.mark.parametrize("cut", [1, 2, 3, 10, 43])
def test_truncated_raises_wav_error(cut: int) -> None:
    data = write_wav(pcm_of(*range(20)), 24000)
    with pytest.raises(WavError):
        read_wav(data[:-cut] if cut < 44 else data[:cut])


def test_truncated_data_is_named() -> None:
    data = write_wav(pcm_of(*range(20)), 24000)
    with pytest.raises(WavError, match="truncated"):
        read_wav(data[:-4])


@pytest.mark.parametrize("width", [1, 3, 4])
def test_non_16_bit_raises_wav_error(width: int) -> None:
    with pytest.raises(WavError, match="16-bit"):
        read_wav(stdlib_wav(bytes(width * 4), width=width))


@given(st.binary(max_size=200))
def test_any_bytes_raise_only_wav_error(data: bytes) -> None:
    with contextlib.suppress(WavError):
        read_wav(data)


@given(st.binary(max_size=60))
def test_any_prefix_of_header_raises_only_wav_error(tail: bytes) -> None:
    data = write_wav(pcm_of(*range(10)), 24000)[:36] + tail
    with contextlib.suppress(WavError):
        read_wav(data)


def test_concat_joins_in_order() -> None:
    a, b, c = pcm_of(1, 2), pcm_of(), pcm_of(3, 4, 5)
    joined = read_wav(concat([write_wav(a, 24000), write_wav(b, 24000), write_wav(c, 24000)]))
    assert joined == WavAudio(sample_rate=24000, channels=1, sample_width=2, frames=5, pcm=a + c)


def test_concat_of_one_is_identity() -> None:
    data = write_wav(pcm_of(7, 8), 32000)
    assert concat([data]) == data


def test_concat_keeps_channels() -> None:
    stereo = stdlib_wav(pcm_of(1, 2), channels=2)
    assert read_wav(concat([stereo, stereo])).frames == 2


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (write_wav(pcm_of(1), 32000), "sample_rate"),
        (stdlib_wav(pcm_of(1, 2), channels=2), "channels"),
    ],
)
def test_concat_mismatch_is_named(other: bytes, field: str) -> None:
    first = write_wav(pcm_of(1), 24000)
    with pytest.raises(WavError, match=f"WAV 2 has {field}"):
        concat([first, first, other])


def test_concat_rejects_empty_and_garbage() -> None:
    with pytest.raises(WavError):
        concat([])
    with pytest.raises(WavError):
        concat([write_wav(b"", 24000), b"garbage"])


@given(st.binary(max_size=300))
def test_base64_round_trip(data: bytes) -> None:
    encoded = to_base64(data)
    assert encoded.isascii() and len(encoded) % 4 == 0
    assert from_base64(encoded) == data


def test_base64_is_standard_alphabet() -> None:
    assert to_base64(b"\xfb\xff") == "+/8="


@pytest.mark.parametrize(
    "text",
    ["abc", "ab=c", "a b c d", "YWJj\n", "YW Jj", "-_8=", "YWJj!", "é===", "Y===", "YWJjZA=", "=YWJ"],
)
def test_from_base64_is_strict(text: str) -> None:
    with pytest.raises(WavError, match="base64"):
        from_base64(text)


def test_wav_error_is_a_value_error() -> None:
    assert issubclass(WavError, ValueError)
