"""Re-encode GLM-TTS's WAV into the formats of OpenAI's speech API (`response_format`).

The backend answers a 16-bit PCM mono WAV (24000 or 32000 Hz); OpenAI clients ask for mp3, opus,
aac, flac, wav or pcm. Everything here uses libraries that ship wheels, so no system ffmpeg is needed:
numpy for sample arithmetic, soundfile (its bundled libsndfile writes FLAC, Ogg Opus and MP3), soxr for
resampling, and -- only with the optional ``aac`` extra -- PyAV, whose wheels bundle FFmpeg's native
AAC encoder.

`encode` is CPU-bound (tens of milliseconds per second of audio for the lossy codecs: see
bench/reports/audio_formats.md), so callers run it off the event loop.

`join_pcm` joins the audio of a long text synthesized in pieces (crossfade, pause or plain, each
without a click at the joins), and `PcmJoiner` does the same piece by piece for a stream;
`join_steps` measures the joins for the tests and the benchmark.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import soundfile as sf  # type: ignore[import-untyped]
import soxr  # type: ignore[import-untyped]

from glmtts.wav import SAMPLE_WIDTH, read_wav, write_wav

# A WAV's rate bounds what resampling may cost: to 48 kHz (opus) at most 6x the samples. Upstream
# writes 24000 or 32000 Hz; anything far outside telephony..studio rates is a broken backend.
MIN_RATE = 8000
MAX_RATE = 192000
PCM_RATE = 24000  # OpenAI's `pcm`: raw 24 kHz 16-bit signed little-endian mono

# Rates each encoder accepts. Opus (RFC 6716) takes only these five. MP3 rates are those of MPEG-1
# (32/44.1/48 kHz) and MPEG-2 (the halves) and MPEG-2.5 (the quarters), all written by libsndfile's
# LAME; 24000 and 32000 are both native, so upstream's audio is never resampled for MP3. AAC: the
# sampling-frequency index of ADTS headers.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
AAC_BITRATE = 64000  # bits/s; transparent enough for mono speech, about what the MP3 VBR default yields
_EMPTY_OK = frozenset({"wav", "pcm"})  # formats with a valid empty file: a bare header, no bytes
AAC_HINT = "response_format aac needs the optional 'aac' extra: pip install 'glmtts-sidecar[aac]'"

Samples = npt.NDArray[np.int16]


@dataclass(frozen=True)
class Pcm:
    """16-bit signed little-endian mono samples at `rate` frames per second.

    Refuses (ValueError) an odd byte count or a rate outside MIN_RATE..MAX_RATE, so every encoder
    can trust it.
    """

    samples: bytes
    rate: int

    def __post_init__(self) -> None:
        if not isinstance(self.rate, int) or isinstance(self.rate, bool):
            raise ValueError(f"sample rate must be an int, got {type(self.rate).__name__}")
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise ValueError(f"sample rate {self.rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
        if len(self.samples) % SAMPLE_WIDTH:
            raise ValueError(f"PCM length {len(self.samples)} is not a whole number of 16-bit samples")

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return len(self.samples) / SAMPLE_WIDTH / self.rate


@dataclass(frozen=True)
class AudioFormat:
    """One `response_format`: its name and the Content-Type OpenAI-compatible servers send for it."""

    name: str
    content_type: str


# OpenAI's order. Content types as OpenAI-compatible servers send them; for opus, whose body is an Ogg
# file, the type RFC 7845 registers for Ogg Opus files (audio/opus, RFC 7587, names RTP payloads).
FORMATS: Mapping[str, AudioFormat] = MappingProxyType({
    f.name: f
    for f in (
        AudioFormat("mp3", "audio/mpeg"),
        AudioFormat("opus", "audio/ogg"),
        AudioFormat("aac", "audio/aac"),
        AudioFormat("flac", "audio/flac"),
        AudioFormat("wav", "audio/wav"),
        AudioFormat("pcm", "audio/pcm"),
    )
})


class UnsupportedFormat(Exception):
    """A `response_format` that is not one of FORMATS, or whose encoder is not installed here."""


def decode_wav(data: bytes) -> Pcm:
    """The samples of a 16-bit PCM mono WAV, as upstream writes.

    Raises ValueError naming the problem for anything else: not a WAV, stereo, 8/24/32-bit or float
    samples, a truncated data chunk, or a rate outside MIN_RATE..MAX_RATE.
    """
    audio = read_wav(data)  # WavError (a ValueError) for non-WAV, non-16-bit, float, truncated
    if audio.channels != 1:
        raise ValueError(f"expected a mono WAV, got {audio.channels} channels")
    return Pcm(audio.pcm, audio.sample_rate)


def available(fmt: str) -> str | None:
    """None if `fmt` can be encoded here, else why not (the text `encode` raises)."""
    if not isinstance(fmt, str):  # a JSON number, list or null from a hostile client
        return f"response_format must be a string, got {type(fmt).__name__}"  # type: ignore[unreachable]
    if fmt not in FORMATS:
        shown = fmt[:40] + "..." if len(fmt) > 40 else fmt
        return f"unknown response_format {shown!r}: expected one of {', '.join(FORMATS)}"
    return _missing_encoder(fmt)


@functools.cache
def _missing_encoder(fmt: str) -> str | None:
    # Cached: the installed libraries do not change while the process runs.
    if fmt == "aac":
        return None if _pyav_has_aac() else AAC_HINT
    if fmt == "mp3" and "MPEG_LAYER_III" not in sf.available_subtypes("MP3"):
        return f"response_format mp3 needs libsndfile >= 1.1 with MP3 support (found {sf.__libsndfile_version__})"
    if fmt == "opus" and "OPUS" not in sf.available_subtypes("OGG"):
        return f"response_format opus needs libsndfile with Ogg Opus support (found {sf.__libsndfile_version__})"
    return None


def _pyav_has_aac() -> bool:
    try:
        import av

        av.codec.Codec("aac", "w")
    except Exception:  # ImportError: the extra is not installed; else a broken install or FFmpeg build
        return False
    return True


def encode(pcm: Pcm, fmt: str) -> bytes:
    """`pcm` as a complete file (or raw stream, for `pcm`) in `fmt`.

    CPU-bound: run it off the event loop. Raises UnsupportedFormat when `fmt` is unknown or its
    encoder is not installed (see `available`), ValueError when the encoder refuses the audio --
    among others an empty clip in a codec format: libsndfile and FFmpeg would write an empty or
    malformed file for it (wav and pcm have a valid empty form and take it).
    """
    why = available(fmt)
    if why is not None:
        raise UnsupportedFormat(why)
    if not pcm.samples and fmt not in _EMPTY_OK:
        raise ValueError(f"no audio to encode as {fmt}: the PCM is empty")
    return _ENCODERS[fmt](pcm)


def _samples(pcm: Pcm) -> Samples:
    return np.frombuffer(pcm.samples, dtype="<i2")


def resample(samples: Samples, rate: int, target: int) -> Samples:
    """`samples` at `target` Hz: soxr's high-quality (HQ) filter, rounded and clipped back to int16.

    Resampling is done in float64 and clipped explicitly, because a full-scale input can overshoot
    int16 after the filter's ringing, and wrapping around would be a loud click.
    """
    if rate == target:
        return samples
    out = soxr.resample(samples.astype(np.float64), rate, target, quality="HQ")
    clipped: Samples = np.clip(np.rint(out), -32768, 32767).astype("<i2")
    return clipped


def _nearest_rate(rate: int, accepted: tuple[int, ...]) -> int:
    """The lowest accepted rate not below `rate` (so no bandwidth is lost), else the highest."""
    return next((r for r in accepted if r >= rate), accepted[-1])


def _encode_wav(pcm: Pcm) -> bytes:
    return write_wav(pcm.samples, pcm.rate)


def _encode_pcm(pcm: Pcm) -> bytes:
    if pcm.rate == PCM_RATE:
        return pcm.samples
    return resample(_samples(pcm), pcm.rate, PCM_RATE).tobytes()


def _libsndfile(samples: Samples, rate: int, *, format: str, subtype: str) -> bytes:
    out = io.BytesIO()
    try:
        with sf.SoundFile(out, "w", samplerate=rate, channels=1, subtype=subtype, format=format) as f:
            f.write(samples)
    except sf.LibsndfileError as exc:
        raise ValueError(f"libsndfile cannot write {format}/{subtype} at {rate} Hz: {exc}") from exc
    return out.getvalue()


def _encode_flac(pcm: Pcm) -> bytes:
    return _libsndfile(_samples(pcm), pcm.rate, format="FLAC", subtype="PCM_16")


def _encode_opus(pcm: Pcm) -> bytes:
    # Opus takes 8/12/16/24/48 kHz only. 32000 goes up to 48000, not down to 24000: 32 kHz audio
    # carries content up to 16 kHz, which 24 kHz (12 kHz band) would cut off, and Opus runs at 48 kHz
    # internally anyway -- its decoders output 48 kHz by default -- so nothing is wasted but a few
    # cycles in the resampler. Libsndfile's default bitrate (about 40 kbit/s mono) suits speech.
    rate = _nearest_rate(pcm.rate, OPUS_RATES)
    return _libsndfile(resample(_samples(pcm), pcm.rate, rate), rate, format="OGG", subtype="OPUS")


def _encode_mp3(pcm: Pcm) -> bytes:
    # Libsndfile's default: LAME VBR, about 40 kbit/s for mono speech at 24/32 kHz, with the LAME tag
    # that lets gapless decoders drop the encoder's delay and padding. 24000 and 32000 are both
    # native MP3 rates (MPEG-2 and MPEG-1 Layer III), so upstream's audio is never resampled.
    rate = _nearest_rate(pcm.rate, MP3_RATES)
    return _libsndfile(resample(_samples(pcm), pcm.rate, rate), rate, format="MP3", subtype="MPEG_LAYER_III")


def _encode_aac(pcm: Pcm) -> bytes:
    """ADTS AAC-LC (a stream of self-describing frames, what audio/aac means) via PyAV's FFmpeg."""
    import av

    rate = _nearest_rate(pcm.rate, AAC_RATES)
    samples = resample(_samples(pcm), pcm.rate, rate)
    out = io.BytesIO()
    with av.open(out, mode="w", format="adts") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        stream.codec_context.bit_rate = AAC_BITRATE
        # FFmpeg's AAC encoder takes planar float frames of exactly frame_size samples: the
        # resampler converts s16 to fltp and re-chunks to that size.
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate, frame_size=1024)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(chunk))
        container.mux(stream.encode(None))
    return out.getvalue()


_ENCODERS: Mapping[str, Callable[[Pcm], bytes]] = MappingProxyType({
    "mp3": _encode_mp3,
    "opus": _encode_opus,
    "aac": _encode_aac,
    "flac": _encode_flac,
    "wav": _encode_wav,
    "pcm": _encode_pcm,
})


# --- Joining synthesized pieces (issue 17: a long text synthesized as several pieces) -------------

EDGE_FADE_S = 0.005  # the fade at each piece's joined edge: 5 ms, far below a syllable (~0.2 s)
MAX_JOIN_S = 5.0  # longest crossfade or pause accepted: bounds the memory a bad setting can ask for
FULL_SCALE = 32768.0  # int16 full scale: join_steps reports steps as a fraction of it


def _ramp(n: int) -> npt.NDArray[np.float64]:
    """n gains rising from just above 0 to just below 1 on a raised cosine (half a Hann window).

    The endpoints 0 and 1 are left out, so every sample in a fade is audible and a ramp of n
    samples joins its neighbours without a repeated value; the cosine's zero slope at both ends
    keeps the gain's own step from adding a corner (a faint click) where the fade meets the signal.
    """
    k = np.arange(1, n + 1, dtype=np.float64)
    ramp: npt.NDArray[np.float64] = 0.5 - 0.5 * np.cos(np.pi * k / (n + 1))
    return ramp


def _check_seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not (math.isfinite(value) and 0 <= value <= MAX_JOIN_S):
        raise ValueError(f"{name} must be between 0 and {MAX_JOIN_S:g} s, got {value!r}")
    return float(value)


def _check_pieces(pieces: Sequence[Pcm]) -> int:
    """The one sample rate all pieces share; ValueError for no pieces, a non-Pcm or mixed rates."""
    if not isinstance(pieces, Sequence):  # a str or bytes fails below: its items are not Pcm
        raise ValueError(f"pieces must be a sequence of Pcm, got {type(pieces).__name__}")
    if not pieces:
        raise ValueError("no pieces to join")
    for i, piece in enumerate(pieces):
        if not isinstance(piece, Pcm):
            raise ValueError(f"piece {i} is a {type(piece).__name__}, not Pcm")
    rates = sorted({p.rate for p in pieces})
    if len(rates) > 1:
        raise ValueError(f"pieces must share one sample rate, got {', '.join(map(str, rates))} Hz")
    return rates[0]


def _to_int16(x: npt.NDArray[np.float64]) -> Samples:
    # Rounded and clipped, never wrapped: wrapping a sample past full scale flips its sign (a click).
    out: Samples = np.clip(np.rint(x), -32768, 32767).astype("<i2")
    return out


def crossfade_overlaps(pieces: Sequence[Pcm], crossfade_s: float) -> list[int]:
    """The overlap join_pcm uses at each join, in samples: crossfade_s (rounded) clamped to half
    of either piece it joins, so a piece's head and tail overlaps never meet. Each join is clamped
    on its own, which a stream can do without knowing the pieces still to come (see PcmJoiner)."""
    rate = _check_pieces(pieces)
    wanted = round(_check_seconds("crossfade_s", crossfade_s) * rate)
    sizes = [len(p.samples) // SAMPLE_WIDTH for p in pieces]
    return [min(wanted, a // 2, b // 2) for a, b in itertools.pairwise(sizes)]


def join_offsets(pieces: Sequence[Pcm], *, crossfade_s: float = 0.0, pause_s: float = 0.0) -> list[int]:
    """Where each piece after the first begins in join_pcm's output, in samples: the start of its
    overlap with the previous piece for a crossfade, the first sample after the pause for a pause.
    Lets callers (tests, the benchmark) look at the joins."""
    rate = _check_pieces(pieces)
    overlaps = crossfade_overlaps(pieces, crossfade_s)
    gap = round(_check_seconds("pause_s", pause_s) * rate)
    offsets, at = [], 0
    for piece, overlap in zip(pieces, overlaps, strict=False):  # every piece but the last
        at += len(piece.samples) // SAMPLE_WIDTH - overlap + gap
        offsets.append(at)
    return offsets


def join_pcm(pieces: Sequence[Pcm], *, crossfade_s: float = 0.0, pause_s: float = 0.0) -> Pcm:
    """The pieces one after another, joined so that no join clicks.

    - `pause_s > 0`: that much silence between pieces; each piece fades out over its last
      EDGE_FADE_S (5 ms) before it and the next fades in over its first 5 ms after it, so the step
      to and from silence is not a click. A piece shorter than 10 ms fades over half its length.
    - `crossfade_s > 0`: each piece's tail overlaps the next one's head by crossfade_s, clamped at
      each join to half of either piece (see crossfade_overlaps). The gains are complementary
      raised cosines that sum to 1 ("linear" in amplitude, not equal-power), chosen for speech:
      consecutive pieces of one voice are correlated (same pitch range, often near-silence at both
      ends), and gains summing to 1 pass correlated audio at its level and can never exceed full
      scale -- a constant stays constant -- whereas equal-power gains (summing to up to sqrt 2)
      would swell correlated audio by up to 3 dB in the overlap and could clip. Uncorrelated audio
      dips by at most 3 dB for the few milliseconds of the overlap, which is inaudible. Arithmetic
      in float, rounded and clipped to int16, never wrapped.
    - both 0: plain concatenation, still with the 5 ms edge fades at each join (as is a crossfade
      that rounds to 0 samples).
    - both > 0: ValueError (one or the other).

    Length, exactly: sum of the pieces' samples minus the sum of crossfade_overlaps(pieces,
    crossfade_s), or plus (n-1) * round(pause_s * rate). The first piece's head and the last
    piece's tail are left as they are (they are not joins). One piece is returned as is. Raises
    ValueError for no pieces, a non-Pcm piece, pieces of different rates, or a negative,
    non-finite or too long (over MAX_JOIN_S) crossfade or pause. The same as pushing the pieces
    through a PcmJoiner, which it does.
    """
    joiner = PcmJoiner(_check_pieces(pieces), crossfade_s=crossfade_s, pause_s=pause_s)
    if len(pieces) == 1:
        return pieces[0]
    parts = [joiner.push(piece).samples for piece in pieces]
    parts.append(joiner.close().samples)
    return Pcm(b"".join(parts), joiner.rate)


class PcmJoiner:
    """join_pcm for a stream: `push` each piece as it comes, `close` after the last.

    Everything `push` and `close` return, concatenated, is join_pcm(pieces) byte for byte. Each
    piece's end is held back until the next piece (or `close`) says how it joins, and only as much
    of it as a join can touch: the overlap (round(crossfade_s * rate) samples, at most half the
    piece) or the edge fade before a pause, so memory does not grow with the stream. Raises
    ValueError as join_pcm does for a bad rate or bad seconds, and for a non-Pcm piece, a piece of
    another rate, and a push or close after close. One caller at a time.
    """

    def __init__(self, rate: int, *, crossfade_s: float = 0.0, pause_s: float = 0.0) -> None:
        Pcm(b"", rate)  # refuses a rate no Pcm may have
        crossfade_s = _check_seconds("crossfade_s", crossfade_s)
        pause_s = _check_seconds("pause_s", pause_s)
        if crossfade_s > 0 and pause_s > 0:
            raise ValueError("join with a crossfade or a pause, not both")
        self.rate = rate
        self._overlap = round(crossfade_s * rate)  # > 0: crossfade; 0: edge fades around a pause
        self._gap = np.zeros(round(pause_s * rate), dtype=np.float64)
        self._edge = round(EDGE_FADE_S * rate)
        self._tail: Samples | None = None  # the held-back end of the last piece; None before one
        self._closed = False

    def push(self, piece: Pcm) -> Pcm:
        """The samples of the output that `piece` makes final: the previous piece's held-back end
        joined to this one's head, and this piece up to its own held-back end."""
        self._check_open()
        if not isinstance(piece, Pcm):
            raise ValueError(f"a piece must be Pcm, got {type(piece).__name__}")
        if piece.rate != self.rate:
            raise ValueError(f"pieces must share one sample rate, got {self.rate}, {piece.rate} Hz")
        x = _samples(piece)
        joined, used = self._join(x) if self._tail is not None else (b"", 0)
        held = min(self._overlap or self._edge, len(x) // 2)
        self._tail = x[len(x) - held:]
        return Pcm(joined + x[used:len(x) - held].tobytes(), self.rate)

    def close(self) -> Pcm:
        """The rest: the last piece's held-back end, as it is (the end of the audio is no join).
        An empty Pcm at the rate when nothing was pushed."""
        self._check_open()
        self._closed = True
        tail, self._tail = self._tail, None
        return Pcm(b"" if tail is None else tail.tobytes(), self.rate)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the joiner is closed")

    def _join(self, x: Samples) -> tuple[bytes, int]:
        """The held tail joined to the head of `x`, and how many of x's samples that used."""
        assert self._tail is not None
        tail = self._tail.astype(np.float64)
        if self._overlap:
            n = min(len(tail), len(x) // 2)
            fade_in = _ramp(n)
            # Complementary gains: they sum to exactly 1 at every sample.
            tail[len(tail) - n:] = tail[len(tail) - n:] * (1.0 - fade_in) + x[:n] * fade_in
            return _to_int16(tail).tobytes(), n
        n = min(self._edge, len(x) // 2)
        head = x[:n] * _ramp(n)
        return _to_int16(np.concatenate([tail * _ramp(len(tail))[::-1], self._gap, head])).tobytes(), n


@dataclass(frozen=True)
class JoinSteps:
    """The largest sample-to-sample step near the joins and elsewhere, as fractions of full scale."""

    at_joins: float
    elsewhere: float


def join_steps(pcm: Pcm, joins: Sequence[int], window: int) -> JoinSteps:
    """The largest absolute step |x[n] - x[n-1]| within `window` samples either side of each join
    (a sample index, e.g. from join_offsets), and the largest step everywhere else.

    A click is a step far larger than the audio's own: compare at_joins with elsewhere, or with the
    steps inside the pieces before joining. Raises ValueError for a negative window or a join
    outside the audio.
    """
    x = _samples(pcm).astype(np.int32)
    if window < 0:
        raise ValueError(f"window must be >= 0 samples, got {window}")
    steps = np.abs(np.diff(x))  # steps[k] is the step from sample k to sample k+1
    near = np.zeros(len(steps), dtype=bool)
    for j in joins:
        if not 0 <= j <= len(x):
            raise ValueError(f"join at sample {j} is outside the audio (0..{len(x)})")
        near[max(0, j - window - 1):j + window] = True
    at_joins = int(steps[near].max()) if near.any() else 0
    elsewhere = int(steps[~near].max()) if (~near).any() else 0
    return JoinSteps(at_joins / FULL_SCALE, elsewhere / FULL_SCALE)
