"""Streaming encoders: OpenAI's `response_format`s that can be sent while the audio is still coming.

A long text is synthesized in pieces (see audio.PcmJoiner); a client streaming the answer wants the
first piece's audio as soon as it is there, not the whole file at the end. `stream_encoder` gives an
encoder that takes the PCM piece by piece (`feed`) and hands out the bytes that are ready, then the
rest (`finish`). The concatenated bytes are one valid stream of the format:

- wav: a RIFF/WAVE header whose RIFF and data sizes say 0xFFFFFFFF (unknown: the convention of
  streaming servers, which players read as "until the end"), then the samples as they are.
- pcm: raw 24 kHz int16 (OpenAI's `pcm`), resampled incrementally when the input is not 24 kHz.
- opus: Ogg Opus, resampled as encode() does; each Ogg page goes out as libsndfile completes it
  (about a second of audio per page), and the end is trimmed exactly by the last page's granule
  position, so the decoded duration is the input's.
- mp3: see Mp3Stream -- constant bitrate and no LAME tag, the form of an MP3 stream of unknown
  length, which decoders cannot trim of the codec's delay (a few tens of milliseconds).

flac and aac are not offered: libsndfile's FLAC writer seeks back to fill in its STREAMINFO, and the
AAC path goes through PyAV's muxer. Each encoder keeps its own state (no globals) and is used by
one thread at a time; `feed` and `finish` are CPU-bound, so callers run them off the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import soundfile as sf  # type: ignore[import-untyped]
import soxr  # type: ignore[import-untyped]

from glmtts.audio import (
    FORMATS,
    MP3_RATES,
    OPUS_RATES,
    PCM_RATE,
    Pcm,
    Samples,
    UnsupportedFormat,
    available,
)
from glmtts.wav import wav_header

STREAMABLE = ("mp3", "opus", "wav", "pcm")
MP3_STREAM_BITRATE = 64  # kbit/s, constant: ample for mono speech at 24/32 kHz (encode's VBR spends ~40)
UNKNOWN_SIZE = 0xFFFFFFFF  # a streamed WAV's RIFF and data sizes: its length is not known up front


def stream_encoder(fmt: str, rate: int) -> StreamEncoder:
    """A fresh encoder of `rate` Hz PCM into `fmt`, one of STREAMABLE.

    Raises ValueError naming `fmt` when it is not streamable (flac, aac, or unknown) or the rate is
    outside what Pcm accepts; UnsupportedFormat when its encoder is not installed here (as encode()).
    """
    if fmt not in STREAMABLE:
        shown = str(fmt)[:40]
        raise ValueError(f"response_format {shown!r} cannot be streamed: expected one of {', '.join(STREAMABLE)}")
    why = available(fmt)
    if why is not None:
        raise UnsupportedFormat(why)
    Pcm(b"", rate)  # refuses a rate no Pcm may have
    return _STREAMS[fmt](rate)


class StreamEncoder(ABC):
    """Encodes one stream: `feed` PCM at `rate` any number of times, then `finish` once.

    Each returns the encoded bytes ready by then (possibly b""); all of them concatenated are the
    stream. ValueError for a Pcm of another rate, a feed or finish after finish, and (mp3 and opus,
    whose empty file would be malformed, as encode() refuses it) a finish with no audio fed.
    """

    def __init__(self, fmt: str, rate: int) -> None:
        self.format = fmt
        self.rate = rate
        self.content_type = FORMATS[fmt].content_type
        self._fed = 0  # samples fed so far
        self._finished = False

    def feed(self, pcm: Pcm) -> bytes:
        """The bytes `pcm` completes (codecs hold some audio back for their next frame)."""
        self._check_open()
        if not isinstance(pcm, Pcm):
            raise ValueError(f"feed takes Pcm, got {type(pcm).__name__}")
        if pcm.rate != self.rate:
            raise ValueError(f"this stream takes {self.rate} Hz audio, got {pcm.rate} Hz")
        samples: Samples = np.frombuffer(pcm.samples, dtype="<i2")
        self._fed += len(samples)
        return self._encode(samples)

    def finish(self) -> bytes:
        """The rest of the stream; the encoder takes nothing after it."""
        self._check_open()
        self._finished = True
        return self._flush()

    def _check_open(self) -> None:
        if self._finished:
            raise ValueError("the stream is finished")

    @abstractmethod
    def _encode(self, samples: Samples) -> bytes: ...

    @abstractmethod
    def _flush(self) -> bytes: ...


class WavStream(StreamEncoder):
    """A WAV header at `rate` with unknown sizes, then the samples unchanged."""

    def __init__(self, rate: int) -> None:
        super().__init__("wav", rate)
        self._header: bytes | None = wav_header(rate, UNKNOWN_SIZE)  # None once sent

    def _encode(self, samples: Samples) -> bytes:
        header, self._header = self._header or b"", None
        return header + samples.tobytes()

    def _flush(self) -> bytes:
        return self._encode(np.zeros(0, dtype="<i2"))


class _Resampler:
    """soxr's streaming resampler with encode()'s settings (HQ, float64, rounded and clipped to
    int16); a pass-through when the rates match."""

    def __init__(self, rate: int, target: int) -> None:
        self._stream = None if rate == target else soxr.ResampleStream(rate, target, 1, dtype="float64", quality="HQ")

    def push(self, samples: Samples, *, last: bool = False) -> Samples:
        if self._stream is None:
            return samples
        out = self._stream.resample_chunk(samples.astype(np.float64), last=last)
        clipped: Samples = np.clip(np.rint(out), -32768, 32767).astype("<i2")
        return clipped


class PcmStream(StreamEncoder):
    """Raw 24 kHz int16 little-endian: the input itself at 24 kHz, else resampled as it comes."""

    def __init__(self, rate: int) -> None:
        super().__init__("pcm", rate)
        self._resampler = _Resampler(rate, PCM_RATE)

    def _encode(self, samples: Samples) -> bytes:
        return self._resampler.push(samples).tobytes()

    def _flush(self) -> bytes:
        return self._resampler.push(np.zeros(0, dtype="<i2"), last=True).tobytes()


class _Tap:
    """The file libsndfile writes a stream into: `take` hands out what was written since last time.

    libsndfile treats it as a seekable file (a virtual I/O file always is to libsndfile), and some
    writers seek back on close to fill in a header. Bytes already handed out cannot change, so a
    write over them is dropped; the stream must be valid without it (see Mp3Stream).
    """

    def __init__(self) -> None:
        self._pending = bytearray()  # bytes from offset `_sent` on, not yet handed out
        self._sent = 0
        self._pos = 0

    def write(self, data: Any) -> int:
        data = bytes(data)
        start = max(self._pos, self._sent) - self._sent  # where the still-changeable part lands
        keep = data[max(0, self._sent - self._pos):]
        if start > len(self._pending):  # a seek past the end leaves a hole of zeros, as a file does
            self._pending.extend(bytes(start - len(self._pending)))
        self._pending[start:start + len(keep)] = keep
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._sent + len(self._pending))[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        out = bytes(self._pending)
        self._sent += len(out)
        self._pending.clear()
        return out


class _SndfileStream(StreamEncoder):
    """A libsndfile writer on a _Tap: each feed writes the samples and hands out what came out."""

    def __init__(self, fmt: str, rate: int, codec_rate: int, **options: Any) -> None:
        super().__init__(fmt, rate)
        self._resampler = _Resampler(rate, codec_rate)
        self._tap = _Tap()
        try:
            self._file = sf.SoundFile(self._tap, "w", samplerate=codec_rate, channels=1, **options)
        except sf.LibsndfileError as exc:
            raise ValueError(f"libsndfile cannot stream {fmt} at {codec_rate} Hz: {exc}") from exc

    def _encode(self, samples: Samples) -> bytes:
        self._write(self._resampler.push(samples))
        return self._tap.take()

    def _flush(self) -> bytes:
        self._write(self._resampler.push(np.zeros(0, dtype="<i2"), last=True))
        self._file.close()
        out = self._tap.take()
        if not self._fed:
            raise ValueError(f"no audio to stream as {self.format}: nothing was fed")
        return out

    def _write(self, samples: Samples) -> None:
        if len(samples):  # an empty write would still make libsndfile start the file
            self._file.write(samples)


class OpusStream(_SndfileStream):
    """Ogg Opus as encode() writes it: at 24 kHz, or 48 kHz for 32 kHz input (see encode)."""

    def __init__(self, rate: int) -> None:
        codec_rate = next((r for r in OPUS_RATES if r >= rate), OPUS_RATES[-1])
        super().__init__("opus", rate, codec_rate, format="OGG", subtype="OPUS")


class Mp3Stream(_SndfileStream):
    """MP3 (LAME through libsndfile) at a constant MP3_STREAM_BITRATE, without a LAME tag.

    A complete MP3 (encode()) starts with a LAME/Xing tag frame: the frame count, a seek table,
    and the encoder's delay and padding, which gapless decoders trim. libsndfile writes that frame
    as a placeholder (a frame header and zeros) and, on close, seeks back to fill it in -- after the
    stream's start has long been sent. So the placeholder is dropped when the stream starts, and
    the fill-in on close lands on bytes already handed out, which _Tap ignores: the stream is a
    plain run of MP3 frames, what libsndfile itself writes to a pipe. Without the tag, decoders keep
    the codec's delay (LAME's 576 samples plus the decoder's 529) and the last frame's padding, and
    estimate the length from the first frame's bitrate: hence a constant bitrate, with which that
    estimate is right (libsndfile's own reader truncates a variable-bitrate stream without a tag).
    """

    def __init__(self, rate: int) -> None:
        codec_rate = next((r for r in MP3_RATES if r >= rate), MP3_RATES[-1])
        super().__init__(
            "mp3", rate, codec_rate, format="MP3", subtype="MPEG_LAYER_III",
            bitrate_mode="CONSTANT", compression_level=_mp3_level(codec_rate, MP3_STREAM_BITRATE),
        )
        self._head: bytes | None = b""  # the stream's start, until its first frame is whole; then None

    def _encode(self, samples: Samples) -> bytes:
        return self._without_placeholder(super()._encode(samples))

    def _flush(self) -> bytes:
        return self._without_placeholder(super()._flush(), last=True)

    def _without_placeholder(self, data: bytes, *, last: bool = False) -> bytes:
        if self._head is None:
            return data
        head = self._head + data
        size = _frame_size(head)
        if size is None or len(head) < size:  # the first frame is not whole yet
            if not last:
                self._head = head
                return b""
            size = 0
        self._head = None
        placeholder = size > 4 and not any(head[4:size])  # a header, then zeros: the tag to come
        return head[size:] if placeholder else head


# Layer III bitrates in kbit/s by the header's 4-bit index, for MPEG-1 and for MPEG-2 and 2.5.
_MPEG1_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0)
_MPEG2_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0)
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _frame_size(head: bytes) -> int | None:
    """The length in bytes of the MPEG Layer III frame `head` starts with: None when `head` is
    shorter than a frame header, 0 when it is no Layer III frame header (or a free-format one)."""
    if len(head) < 4:
        return None
    h = int.from_bytes(head[:4], "big")
    version, layer = (h >> 19) & 3, (h >> 17) & 3
    bitrate_index, rate_index, padding = (h >> 12) & 15, (h >> 10) & 3, (h >> 9) & 1
    if h >> 21 != 0x7FF or layer != 1 or version not in _MPEG_RATES or rate_index == 3:
        return 0
    kbps = (_MPEG1_KBPS if version == 3 else _MPEG2_KBPS)[bitrate_index]
    if not kbps:  # free format or a bad index: no length in the header
        return 0
    per_frame = 144 if version == 3 else 72  # bytes per (bit/s / Hz): 1152 or 576 samples a frame
    return per_frame * kbps * 1000 // _MPEG_RATES[version][rate_index] + padding


def _mp3_level(rate: int, kbps: int) -> float:
    """libsndfile's compression level (0..1) that makes its constant-bitrate MP3 `kbps`: it maps
    the level linearly onto each MPEG version's bitrate range (MPEG-1 32..320, MPEG-2 8..160,
    MPEG-2.5 8..64 kbit/s), and LAME takes the nearest valid bitrate."""
    low, high = (32, 320) if rate >= 32000 else (8, 160) if rate >= 16000 else (8, 64)
    return min(1.0, max(0.0, (high - kbps) / (high - low)))


_STREAMS: Mapping[str, Callable[[int], StreamEncoder]] = MappingProxyType({
    "mp3": Mp3Stream,
    "opus": OpusStream,
    "wav": WavStream,
    "pcm": PcmStream,
})
