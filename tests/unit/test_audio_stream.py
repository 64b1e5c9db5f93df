"""glmtts.audio.PcmJoiner and glmtts.audio_stream: joining and encoding piece by piece, for streaming.

The joiner must give exactly join_pcm's bytes however the pieces come. The streams are decoded with
real decoders (libsndfile through soundfile, FFmpeg through PyAV) and held to the input's length
within what each format can promise, stated per format below.
"""

from __future__ import annotations

import io
import itertools
import math
import struct

import av
import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from glmtts.audio import EDGE_FADE_S, Pcm, PcmJoiner, decode_wav, encode, join_pcm
from glmtts.audio_stream import (
    STREAMABLE,
    UNKNOWN_SIZE,
    StreamEncoder,
    _frame_size,
    _Tap,
    stream_encoder,
)
from glmtts.emulator.voice import SECONDS_PER_UNIT, render_speech

RATES = (24000, 32000)  # what upstream writes
CHUNKS = (997, 4800, None)  # samples per feed; None: each piece whole
# MP3 without its LAME tag (a stream cannot have one: see Mp3Stream) decodes with the codec's delay
# in front -- LAME's 576 samples plus the decoder's 529 -- and is padded to whole frames at the end.
MP3_DELAY = 576 + 529
MP3_FRAME = {24000: 576, 32000: 1152}  # samples per frame: MPEG-2 and MPEG-1 Layer III
# Opus and pcm resample (32 kHz to 48 kHz, 32 kHz to 24 kHz): the resampler's output length is the
# input's times the ratio, rounded; Ogg Opus trims its own delay exactly. Allow a millisecond.
RESAMPLE_ALLOWANCE_S = 0.001


def as_array(pcm: Pcm) -> npt.NDArray[np.int16]:
    return np.frombuffer(pcm.samples, dtype="<i2")


def speech(rate: int, seed: int, seconds: float = 1.2) -> Pcm:
    """The emulator's synthetic voice: harmonic syllables with gaps and silent lead-in and -out."""
    return decode_wav(render_speech(text=f"piece {seed}", units=seconds / SECONDS_PER_UNIT, sample_rate=rate,
                                    seed=seed, duration_s=seconds))


def pieces_of(rate: int) -> list[Pcm]:
    return [speech(rate, seed, seconds) for seed, seconds in ((1, 1.2), (2, 0.7), (3, 1.5))]


def stream(encoder: StreamEncoder, pieces: list[Pcm], chunk: int | None) -> tuple[bytes, bytes]:
    """(what the feeds returned, what finish returned), feeding each piece in `chunk`-sample slices."""
    fed: list[bytes] = []
    for piece in pieces:
        x = as_array(piece)
        step = chunk or max(1, len(x))
        fed.extend(encoder.feed(Pcm(x[i:i + step].tobytes(), piece.rate)) for i in range(0, len(x), step))
    return b"".join(fed), encoder.finish()


def decode_sf(data: bytes) -> tuple[npt.NDArray[np.int16], int]:
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    return samples, rate


def decode_av(data: bytes) -> tuple[int, int]:
    """(rate, samples) as FFmpeg decodes the stream."""
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.samples for frame in container.decode(audio=0)]
        return container.streams.audio[0].sample_rate, sum(frames)


# --- The streaming encoders ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("rate", RATES)
def test_wav_stream_is_the_input_behind_a_header_of_unknown_size(rate: int, chunk: int | None) -> None:
    pieces = pieces_of(rate)
    encoder = stream_encoder("wav", rate)
    data = b"".join(stream(encoder, pieces, chunk))
    riff, riff_size, wave, fmt, fmt_size, tag, channels, wav_rate, byte_rate, align, bits = struct.unpack(
        "<4sI4s4sIHHIIHH", data[:36]
    )
    assert (riff, wave, fmt, fmt_size, tag, channels, bits) == (b"RIFF", b"WAVE", b"fmt ", 16, 1, 1, 16)
    assert (wav_rate, byte_rate, align) == (rate, 2 * rate, 2)
    assert data[36:40] == b"data" and struct.unpack("<I", data[40:44])[0] == UNKNOWN_SIZE
    assert riff_size == UNKNOWN_SIZE
    expected = b"".join(p.samples for p in pieces)
    assert data[44:] == expected
    samples, decoded_rate = decode_sf(data)  # a decoder reads it to the end of the bytes
    assert decoded_rate == rate and samples.tobytes() == expected
    assert encoder.content_type == "audio/wav"


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("rate", RATES)
def test_pcm_stream_is_24_khz(rate: int, chunk: int | None) -> None:
    pieces = pieces_of(rate)
    whole = Pcm(b"".join(p.samples for p in pieces), rate)
    data = b"".join(stream(stream_encoder("pcm", rate), pieces, chunk))
    out = np.frombuffer(data, dtype="<i2")
    if rate == 24000:
        assert data == whole.samples  # untouched
    else:
        assert abs(len(out) / 24000 - whole.duration_s) <= RESAMPLE_ALLOWANCE_S
        # Resampled incrementally, yet what encode() makes in one go, to the LSB.
        oneshot = np.frombuffer(encode(whole, "pcm"), dtype="<i2")
        assert len(out) == len(oneshot)
        assert int(np.abs(out.astype(np.int32) - oneshot).max()) <= 1


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("rate", RATES)
def test_opus_stream_decodes_to_the_input_length(rate: int, chunk: int | None) -> None:
    pieces = pieces_of(rate)
    seconds = sum(p.duration_s for p in pieces)
    encoder = stream_encoder("opus", rate)
    data = b"".join(stream(encoder, pieces, chunk))
    assert data[:4] == b"OggS" and encoder.content_type == "audio/ogg"
    samples, decoded_rate = decode_sf(data)
    assert decoded_rate == {24000: 24000, 32000: 48000}[rate]  # encode()'s rates
    assert abs(len(samples) / decoded_rate - seconds) <= RESAMPLE_ALLOWANCE_S
    av_rate, av_samples = decode_av(data)  # FFmpeg decodes Opus at 48 kHz
    assert av_rate == 48000 and abs(av_samples / av_rate - seconds) <= RESAMPLE_ALLOWANCE_S
    level = np.sqrt(np.mean(samples.astype(np.float64) ** 2))
    assert level > 1000  # the voice, not silence


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("rate", RATES)
def test_mp3_stream_decodes_to_the_input_after_the_codec_delay(rate: int, chunk: int | None) -> None:
    pieces = pieces_of(rate)
    x = np.concatenate([as_array(p) for p in pieces]).astype(np.float64)
    encoder = stream_encoder("mp3", rate)
    data = b"".join(stream(encoder, pieces, chunk))
    assert encoder.content_type == "audio/mpeg"
    # libsndfile seeks back on close to fill in the LAME tag frame it left at the start; the stream
    # drops that placeholder (a header and zeros), so it starts with a frame of audio.
    first = _frame_size(data) or 0
    assert 4 < first <= len(data) and any(data[4:first])
    samples, decoded_rate = decode_sf(data)
    assert decoded_rate == rate
    extra = len(samples) - len(x)
    assert MP3_DELAY <= extra <= MP3_DELAY + MP3_FRAME[rate]  # delay, then padding to whole frames
    assert decode_av(data) == (rate, len(samples))  # FFmpeg reads the same stream alike
    decoded = samples[MP3_DELAY:MP3_DELAY + len(x)].astype(np.float64)
    assert np.corrcoef(decoded, x)[0, 1] > 0.99  # the input itself, right after the delay


@pytest.mark.parametrize("fmt", STREAMABLE)
def test_streams_give_bytes_before_finish(fmt: str) -> None:
    pieces = [speech(24000, seed, 1.5) for seed in (4, 5, 6)]
    encoder = stream_encoder(fmt, 24000)
    outputs = [encoder.feed(piece) for piece in pieces]
    rest = encoder.finish()
    assert all(outputs)  # every 1.5 s piece sends audio at once, not at the end
    assert sum(map(len, outputs)) >= 0.5 * (sum(map(len, outputs)) + len(rest))


@pytest.mark.parametrize("fmt", STREAMABLE)
def test_empty_feeds_are_harmless(fmt: str) -> None:
    piece = speech(24000, 7, 0.5)
    encoder = stream_encoder(fmt, 24000)
    empty = Pcm(b"", 24000)
    data = encoder.feed(empty) + encoder.feed(piece) + encoder.feed(empty) + encoder.finish()
    reference = stream_encoder(fmt, 24000)
    expected = reference.feed(piece) + reference.finish()
    if fmt in ("wav", "pcm"):
        assert data == expected
    else:  # an Ogg stream has a random serial number: compare what decodes
        assert np.array_equal(decode_sf(data)[0], decode_sf(expected)[0])


@pytest.mark.parametrize("fmt", ["mp3", "opus"])
def test_a_codec_stream_with_no_audio_is_refused(fmt: str) -> None:
    encoder = stream_encoder(fmt, 24000)
    assert encoder.feed(Pcm(b"", 24000)) == b""
    with pytest.raises(ValueError, match=f"no audio to stream as {fmt}"):
        encoder.finish()


def test_raw_streams_with_no_audio_are_empty() -> None:
    assert stream_encoder("pcm", 32000).finish() == b""
    wav = stream_encoder("wav", 32000).finish()
    assert len(wav) == 44 and struct.unpack("<I", wav[24:28])[0] == 32000


@pytest.mark.parametrize("fmt", STREAMABLE)
def test_a_finished_stream_takes_nothing_more(fmt: str) -> None:
    encoder = stream_encoder(fmt, 24000)
    encoder.feed(speech(24000, 8, 0.4))
    encoder.finish()
    with pytest.raises(ValueError, match="finished"):
        encoder.feed(speech(24000, 8, 0.4))
    with pytest.raises(ValueError, match="finished"):
        encoder.finish()


def test_feed_refuses_another_rate_or_a_non_pcm() -> None:
    encoder = stream_encoder("opus", 24000)
    with pytest.raises(ValueError, match="takes 24000 Hz audio, got 32000 Hz"):
        encoder.feed(Pcm(b"\0\0", 32000))
    with pytest.raises(ValueError, match="feed takes Pcm, got bytes"):
        encoder.feed(b"\0\0")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["flac", "aac", "ogg", "", "mp3 "])
def test_formats_that_cannot_stream_are_refused_by_name(fmt: str) -> None:
    with pytest.raises(ValueError, match=f"response_format '{fmt}' cannot be streamed"):
        stream_encoder(fmt, 24000)


@pytest.mark.parametrize("rate", [7999, 192001])
def test_a_rate_no_pcm_may_have_is_refused(rate: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        stream_encoder("wav", rate)


def test_other_rates_follow_encodes_conventions() -> None:
    # 16 kHz is a native rate of both codecs; 44.1 kHz is resampled to 48 kHz for Opus only.
    for rate, opus_rate in ((16000, 16000), (44100, 48000)):
        piece = speech(rate, 9, 1.0)
        for fmt, expected in (("opus", opus_rate), ("mp3", rate)):
            encoder = stream_encoder(fmt, rate)
            samples, decoded_rate = decode_sf(encoder.feed(piece) + encoder.finish())
            assert decoded_rate == expected and len(samples) / decoded_rate >= piece.duration_s - 0.001


def test_the_tap_hands_out_bytes_once_and_drops_rewrites_of_them() -> None:
    tap = _Tap()
    assert tap.write(b"abcd") == 4 and tap.take() == b"abcd" and tap.take() == b""
    tap.write(b"ef")
    assert tap.seek(0, io.SEEK_END) == 6 and tap.tell() == 6
    tap.seek(2)
    tap.write(b"XXYZ")  # "XX" lands on bytes handed out: dropped; "YZ" rewrites the pending "ef"
    assert tap.tell() == 6 and tap.take() == b"YZ"
    tap.seek(8)
    tap.write(b"g")  # a seek past the end leaves a hole of zeros, as a file would
    assert tap.take() == b"\0\0g"


# --- PcmJoiner: join_pcm piece by piece -------------------------------------------------------------


def ramp(n: int) -> npt.NDArray[np.float64]:
    k = np.arange(1, n + 1, dtype=np.float64)
    out: npt.NDArray[np.float64] = 0.5 - 0.5 * np.cos(np.pi * k / (n + 1))
    return out


def reference_join(pieces: list[Pcm], rate: int, *, crossfade_s: float = 0.0, pause_s: float = 0.0) -> bytes:
    """join_pcm's documented arithmetic done the plain way, on all pieces at once: each join's
    overlap (crossfade_s clamped to half of either piece) or edge fades around the pause."""
    xs = [as_array(p).astype(np.float64) for p in pieces]
    n, wanted, edge = len(xs), round(crossfade_s * rate), round(EDGE_FADE_S * rate)
    if n == 1:
        return pieces[0].samples
    if wanted:
        overlaps = [min(wanted, len(a) // 2, len(b) // 2) for a, b in itertools.pairwise(xs)]
        out = np.zeros(sum(map(len, xs)) - sum(overlaps))
        at = 0
        for i, x in enumerate(xs):
            if i:
                x[:overlaps[i - 1]] *= ramp(overlaps[i - 1])
            if i < n - 1:
                x[len(x) - overlaps[i]:] *= 1.0 - ramp(overlaps[i])
            out[at:at + len(x)] += x
            at += len(x) - (overlaps[i] if i < n - 1 else 0)
    else:
        parts = []
        for i, x in enumerate(xs):
            fade = min(edge, len(x) // 2)
            if i:
                parts.append(np.zeros(round(pause_s * rate)))
                x[:fade] *= ramp(fade)
            if i < n - 1:
                x[len(x) - fade:] *= ramp(fade)[::-1]
            parts.append(x)
        out = np.concatenate(parts)
    return np.clip(np.rint(out), -32768, 32767).astype("<i2").tobytes()


def run_joiner(pieces: list[Pcm], rate: int, **kwargs: float) -> tuple[list[Pcm], Pcm]:
    joiner = PcmJoiner(rate, **kwargs)
    return [joiner.push(piece) for piece in pieces], joiner.close()


def joined_bytes(pushed: list[Pcm], closed: Pcm) -> bytes:
    return b"".join(p.samples for p in [*pushed, closed])


lengths = st.lists(st.integers(0, 1500), min_size=1, max_size=6)
modes = st.one_of(
    st.just({}),
    st.builds(lambda s: {"pause_s": s}, st.floats(0, 0.05)),
    st.builds(lambda s: {"crossfade_s": s}, st.floats(0, 0.05)),  # up to 1600 samples: clamps bind
)


@settings(max_examples=200, deadline=None)
@given(lengths, st.sampled_from(RATES), modes, st.integers(0, 2**32 - 1))
def test_joiner_output_is_join_pcm_byte_for_byte(
    sizes: list[int], rate: int, kwargs: dict[str, float], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    pieces = [Pcm(rng.integers(-32768, 32768, n).astype("<i2").tobytes(), rate) for n in sizes]
    pushed, closed = run_joiner(pieces, rate, **kwargs)
    assert joined_bytes(pushed, closed) == join_pcm(pieces, **kwargs).samples
    assert joined_bytes(pushed, closed) == reference_join(pieces, rate, **kwargs)
    assert all(p.rate == rate for p in [*pushed, closed])
    # Only a join's reach is held back: after each push, all but that much of the join so far is out.
    reach = max(round(kwargs.get("crossfade_s", 0) * rate), round(EDGE_FADE_S * rate))
    out = 0
    for i, piece in enumerate(pushed, start=1):
        out += len(piece.samples) // 2
        assert len(join_pcm(pieces[:i], **kwargs).samples) // 2 - out <= reach


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("kwargs", [{}, {"pause_s": 0.1}, {"crossfade_s": 0.02}, {"crossfade_s": 1.0}])
def test_joiner_on_speech_is_join_pcm(rate: int, kwargs: dict[str, float]) -> None:
    pieces = pieces_of(rate)
    pushed, closed = run_joiner(pieces, rate, **kwargs)
    assert joined_bytes(pushed, closed) == join_pcm(pieces, **kwargs).samples
    assert joined_bytes(pushed, closed) == reference_join(pieces, rate, **kwargs)
    assert all(pushed)  # each piece of speech lets audio out at once


def test_joiner_with_pieces_shorter_than_the_overlap() -> None:
    rng = np.random.default_rng(1)
    pieces = [Pcm(rng.integers(-20000, 20000, n).astype("<i2").tobytes(), 24000) for n in (5, 1, 0, 3000, 2, 900)]
    for kwargs in ({"crossfade_s": 0.02}, {"pause_s": 0.01}, {}):
        pushed, closed = run_joiner(pieces, 24000, **kwargs)
        assert joined_bytes(pushed, closed) == join_pcm(pieces, **kwargs).samples
        assert joined_bytes(pushed, closed) == reference_join(pieces, 24000, **kwargs)


def test_joiner_with_one_piece_gives_it_back() -> None:
    piece = speech(24000, 10, 0.3)
    for kwargs in ({"crossfade_s": 0.02}, {"pause_s": 0.1}, {}):
        pushed, closed = run_joiner([piece], 24000, **kwargs)
        assert joined_bytes(pushed, closed) == piece.samples
        assert len(closed.samples) // 2 == round(max(kwargs.get("crossfade_s", 0), EDGE_FADE_S) * 24000)


def test_joiner_closed_without_pieces_is_empty_at_its_rate() -> None:
    assert PcmJoiner(32000, crossfade_s=0.02).close() == Pcm(b"", 32000)


def test_joiner_feeds_a_stream_encoder() -> None:
    pieces = pieces_of(24000)
    joiner, encoder = PcmJoiner(24000, crossfade_s=0.02), stream_encoder("wav", 24000)
    data = b"".join(encoder.feed(joiner.push(p)) for p in pieces) + encoder.feed(joiner.close()) + encoder.finish()
    assert data[44:] == join_pcm(pieces, crossfade_s=0.02).samples


@pytest.mark.parametrize(
    ("rate", "kwargs", "message"),
    [
        (100, {}, "outside"),
        (24000, {"crossfade_s": 0.01, "pause_s": 0.01}, "not both"),
        (24000, {"crossfade_s": -1.0}, "crossfade_s must be between"),
        (24000, {"pause_s": math.nan}, "pause_s must be between"),
        (24000, {"pause_s": "1"}, "pause_s must be a number"),
    ],
)
def test_joiner_refuses_bad_settings(rate: int, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PcmJoiner(rate, **kwargs)  # type: ignore[arg-type]


def test_joiner_refuses_bad_pieces_and_use_after_close() -> None:
    joiner = PcmJoiner(24000, pause_s=0.01)
    with pytest.raises(ValueError, match="24000, 32000 Hz"):
        joiner.push(Pcm(b"\0\0", 32000))
    with pytest.raises(ValueError, match="must be Pcm, got bytes"):
        joiner.push(b"\0\0")  # type: ignore[arg-type]
    joiner.push(Pcm(b"\1\0" * 10, 24000))
    joiner.close()
    with pytest.raises(ValueError, match="closed"):
        joiner.push(Pcm(b"\0\0", 24000))
    with pytest.raises(ValueError, match="closed"):
        joiner.close()
