"""glmtts.audio: every response_format encodes a known signal that real decoders read back intact.

Decoders are real: soundfile (libsndfile with mpg123, libopus, libFLAC) for mp3/opus/flac, the stdlib
`wave` for wav, numpy for raw pcm, PyAV (FFmpeg) for aac when the optional extra is installed.
"""

from __future__ import annotations

import io
import math
import struct
import subprocess
import sys
import wave

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf  # type: ignore[import-untyped]
import soxr  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from glmtts.audio import (
    AAC_HINT,
    FORMATS,
    MAX_RATE,
    MIN_RATE,
    AudioFormat,
    Pcm,
    UnsupportedFormat,
    available,
    decode_wav,
    encode,
    resample,
)
from glmtts.wav import write_wav

RATES = (24000, 32000)  # what upstream writes
SECONDS = 1.3
TONE_HZ = 440.0
HAVE_AAC = available("aac") is None

Int16 = npt.NDArray[np.int16]


def signal(rate: int) -> Int16:
    """A 440 Hz sine with a quieter 300 -> 3000 Hz linear chirp on top: the sine must stay dominant."""
    t = np.arange(round(SECONDS * rate)) / rate
    f0, f1 = 300.0, 3000.0
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * SECONDS)))
    x = 0.3 * np.sin(2 * np.pi * TONE_HZ * t) + 0.1 * chirp
    return np.rint(x * 32767).astype("<i2")


def dominant_hz(x: npt.NDArray[np.generic], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def decode_soundfile(data: bytes) -> tuple[Int16, int]:
    samples, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    assert samples.shape[1] == 1, "mono in, mono out"
    return samples[:, 0], int(rate)


def decode_wave(data: bytes) -> tuple[Int16, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate()


def decode_pcm(data: bytes) -> tuple[Int16, int]:
    return np.frombuffer(data, "<i2"), 24000  # OpenAI's definition: no header, 24 kHz


def decode_aac(data: bytes) -> tuple[Int16, int]:
    import av

    with av.open(io.BytesIO(data), format="adts") as container:
        frames = list(container.decode(audio=0))
    assert all(f.layout.nb_channels == 1 for f in frames)
    x = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])  # fltp, mono: one plane
    return np.rint(np.clip(x, -1, 1) * 32767).astype("<i2"), frames[0].sample_rate


DECODERS = {"mp3": decode_soundfile, "opus": decode_soundfile, "flac": decode_soundfile,
            "wav": decode_wave, "pcm": decode_pcm, "aac": decode_aac}


def promised_rate(fmt: str, rate: int) -> int:
    """pcm is 24 kHz by definition; Opus has no 32 kHz mode and goes up to 48 kHz (see glmtts.audio);
    every other format keeps upstream's rate."""
    return {"pcm": 24000, "opus": 48000 if rate == 32000 else rate}.get(fmt, rate)


def extra_samples_allowed(fmt: str, rate: int) -> tuple[int, int]:
    """(fewest, most) samples the decoded clip may have beyond the input's length, at the output rate.

    - wav, flac, pcm: none; lossless (pcm at 32 kHz: soxr yields round(n * 24000 / 32000) exactly).
    - opus: none, +-1 for resampling's rounding: Ogg Opus stores the encoder's pre-skip and the last
      page's granule position, and libopusfile-style decoders trim both.
    - mp3: libsndfile writes a LAME tag with the encoder delay and padding, and mpg123 trims them, so
      the length is exact; one frame (1152 samples, 576 at MPEG-2 rates) is allowed for a decoder
      that only trims the delay.
    - aac: ADTS has nowhere to say how much to trim, so the decoder returns FFmpeg's 1024 priming
      samples and the last frame's padding to a multiple of 1024: from 1024 up to 2047 extra samples
      (43-85 ms at 24 kHz).
    """
    if fmt == "opus":
        return -1, 1
    if fmt == "mp3":
        return -(1152 if rate >= 32000 else 576), 1152 if rate >= 32000 else 576
    if fmt == "aac":
        return 1024, 2047
    return 0, 0


@pytest.fixture(params=list(FORMATS))
def fmt(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "aac" and not HAVE_AAC:
        pytest.skip(AAC_HINT)
    return name


@pytest.mark.parametrize("rate", RATES)
def test_each_format_decodes_back_to_the_promised_rate_length_and_tone(fmt: str, rate: int) -> None:
    x = signal(rate)
    data = encode(Pcm(x.tobytes(), rate), fmt)
    y, got_rate = DECODERS[fmt](data)
    out_rate = promised_rate(fmt, rate)
    assert got_rate == out_rate
    lo, hi = extra_samples_allowed(fmt, out_rate)
    expected = round(len(x) * out_rate / rate)
    assert lo <= len(y) - expected <= hi, f"{fmt}: {len(y)} samples decoded, {expected} expected"
    assert dominant_hz(y, out_rate) == pytest.approx(TONE_HZ, abs=2.0)
    if fmt in ("wav", "flac") or (fmt == "pcm" and rate == 24000):
        assert np.array_equal(y, x), f"{fmt} must be sample-exact"


@pytest.mark.parametrize("rate", RATES)
def test_lossy_formats_keep_the_waveform_not_just_its_peak(rate: int) -> None:
    """Beyond the dominant frequency: the decoded signal lines up with the input (correlation > 0.9)
    once the codec's fixed delay is removed -- a codec writing noise at 440 Hz would fail here."""
    x = signal(rate)
    for name in ("mp3", "opus", "pcm", *(("aac",) if HAVE_AAC else ())):
        y, out_rate = DECODERS[name](encode(Pcm(x.tobytes(), rate), name))
        target = resample(x, rate, out_rate)  # the input itself unless the format changed its rate
        offset = 1024 if name == "aac" else 0
        n = min(len(target), len(y) - offset)
        corr = np.corrcoef(target[:n].astype(float), y[offset:offset + n].astype(float))[0, 1]
        assert corr > 0.9, f"{name} at {rate} Hz: correlation {corr:.3f}"


def test_pcm_at_32k_is_resampled_to_24k_by_soxr() -> None:
    x = signal(32000)
    y = np.frombuffer(encode(Pcm(x.tobytes(), 32000), "pcm"), "<i2")
    assert len(y) == round(len(x) * 0.75)
    assert dominant_hz(y, 24000) == pytest.approx(TONE_HZ, abs=2.0)


def test_resampling_a_full_scale_signal_clips_instead_of_wrapping() -> None:
    # A full-scale square wave rings past int16 after any band-limiting filter (Gibbs overshoot).
    x = np.where(np.arange(32000) // 40 % 2, 32767, -32768).astype("<i2")
    y = np.frombuffer(encode(Pcm(x.tobytes(), 32000), "pcm"), "<i2").astype(np.int32)
    exact = soxr.resample(x.astype(np.float64), 32000, 24000, quality="HQ")
    assert np.abs(exact).max() > 33000, "the filter does overshoot, so clipping is exercised"
    loud = np.abs(exact) > 16384
    assert np.array_equal(np.sign(y[loud]), np.sign(exact[loud])), "no overshoot wrapped to the other sign"
    assert np.array_equal(y, np.clip(np.rint(exact), -32768, 32767))


def test_wav_output_has_exact_riff_sizes() -> None:
    x = signal(24000)
    data = encode(Pcm(x.tobytes(), 24000), "wav")
    riff_size, = struct.unpack_from("<I", data, 4)
    assert data[:4] == b"RIFF" and riff_size == len(data) - 8
    assert data[36:40] == b"data" and struct.unpack_from("<I", data, 40)[0] == 2 * len(x) == len(data) - 44


def test_formats_are_the_six_in_openai_order_with_their_content_types() -> None:
    assert list(FORMATS) == ["mp3", "opus", "aac", "flac", "wav", "pcm"]
    assert all(isinstance(f, AudioFormat) and f.name == key for key, f in FORMATS.items())
    assert {k: f.content_type for k, f in FORMATS.items()} == {
        "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
        "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm",
    }
    with pytest.raises(TypeError):
        FORMATS["ogg"] = AudioFormat("ogg", "audio/ogg")  # type: ignore[index]


@pytest.mark.parametrize("name", ["ogg", "MP3", "", "wav ", "pcm16", "x" * 10_000])
def test_an_unknown_format_is_refused_naming_the_six(name: str) -> None:
    why = available(name)
    assert why is not None and "mp3, opus, aac, flac, wav, pcm" in why
    assert len(why) < 200, "a hostile name is not echoed whole"
    with pytest.raises(UnsupportedFormat) as info:
        encode(Pcm(signal(24000).tobytes(), 24000), name)
    assert str(info.value) == why


@pytest.mark.parametrize("name", [None, 3, ["mp3"], {"mp3": 1}])
def test_a_format_that_is_not_a_string_is_refused(name: object) -> None:
    why = available(name)  # type: ignore[arg-type]
    assert why is not None and why.startswith("response_format must be a string")
    with pytest.raises(UnsupportedFormat, match="must be a string"):
        encode(Pcm(b"", 24000), name)  # type: ignore[arg-type]


def test_the_libsndfile_formats_are_available_here() -> None:
    assert [available(f) for f in ("mp3", "opus", "flac", "wav", "pcm")] == [None] * 5


def test_aac_without_pyav_says_which_extra_to_install() -> None:
    """Run in a fresh interpreter where `import av` fails, as it does without the extra."""
    code = (
        "import sys; sys.modules['av'] = None\n"
        "from glmtts.audio import Pcm, UnsupportedFormat, available, encode\n"
        "print(available('aac'))\n"
        "try:\n"
        "    encode(Pcm(bytes(4800), 24000), 'aac')\n"
        "except UnsupportedFormat as exc:\n"
        "    print(exc)\n"
        "print(available('mp3'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    hint = "response_format aac needs the optional 'aac' extra: pip install 'glmtts-sidecar[aac]'"
    assert out.stdout.splitlines() == [hint, hint, "None"]


@pytest.mark.parametrize("name", ["mp3", "opus", "aac", "flac"])
def test_an_empty_clip_is_refused_by_codec_formats(name: str) -> None:
    if name == "aac" and not HAVE_AAC:
        pytest.skip(AAC_HINT)
    with pytest.raises(ValueError, match="empty"):
        encode(Pcm(b"", 24000), name)


def test_an_empty_clip_is_a_bare_header_in_wav_and_nothing_in_pcm() -> None:
    assert decode_wav(encode(Pcm(b"", 32000), "wav")) == Pcm(b"", 32000)
    assert encode(Pcm(b"", 32000), "pcm") == b""


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000])
def test_other_rates_reach_a_rate_each_codec_accepts(rate: int) -> None:
    x = np.rint(0.3 * 32767 * np.sin(2 * np.pi * TONE_HZ * np.arange(rate // 2) / rate)).astype("<i2")
    for name in ("mp3", "opus", "flac"):
        y, out_rate = decode_soundfile(encode(Pcm(x.tobytes(), rate), name))
        assert dominant_hz(y, out_rate) == pytest.approx(TONE_HZ, abs=3.0), (name, rate)
        assert abs(len(y) / out_rate - 0.5) < 0.05


# --- Pcm and decode_wav refuse what is not upstream's audio ------------------------------------

def test_pcm_refuses_odd_lengths_and_absurd_rates() -> None:
    with pytest.raises(ValueError, match="whole number of 16-bit"):
        Pcm(b"\x00\x01\x02", 24000)
    for rate in (0, -24000, MIN_RATE - 1, MAX_RATE + 1):
        with pytest.raises(ValueError, match="outside"):
            Pcm(b"", rate)
    with pytest.raises(ValueError, match="int"):
        Pcm(b"", True)  # a bool is an int to Python, not a sample rate
    assert Pcm(bytes(48000), 24000).duration_s == 1.0


def _wav(*, channels: int = 1, width: int = 2, rate: int = 24000, frames: int = 100) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes(frames * channels * width))
    return out.getvalue()


def test_decode_wav_accepts_upstreams_wav() -> None:
    x = signal(32000)
    assert decode_wav(write_wav(x.tobytes(), 32000)) == Pcm(x.tobytes(), 32000)


@pytest.mark.parametrize(("data", "message"), [
    (_wav(channels=2), "mono"),
    (_wav(width=1), "16-bit"),
    (_wav(width=3), "16-bit"),
    (_wav(rate=4000), "outside"),
    (_wav(rate=384000), "outside"),
    (_wav()[:-10], "truncated"),
    (_wav()[:30], "not a valid WAV"),
    (b"", "not a valid WAV"),
    (b"ID3\x04" + bytes(100), "not a valid WAV"),
])
def test_decode_wav_refuses_anything_but_16_bit_mono_pcm(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_wav(data)


def test_decode_wav_refuses_float_samples() -> None:
    out = io.BytesIO()
    sf.write(out, np.zeros(100, dtype=np.float32), 24000, format="WAV", subtype="FLOAT")
    with pytest.raises(ValueError, match="not a valid WAV"):
        decode_wav(out.getvalue())


# --- property: lossless formats are lossless ---------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(
    x=arrays(np.dtype("<i2"), st.integers(min_value=1, max_value=3000)),
    rate=st.sampled_from([8000, 16000, 22050, 24000, 32000, 44100, 48000, 96000]),
)
def test_any_int16_array_round_trips_exactly_through_wav_and_flac(x: Int16, rate: int) -> None:
    pcm = Pcm(x.tobytes(), rate)
    assert decode_wav(encode(pcm, "wav")) == pcm
    y, got_rate = decode_soundfile(encode(pcm, "flac"))
    assert got_rate == rate and np.array_equal(y, x)
    assert math.isclose(pcm.duration_s, len(x) / rate)
