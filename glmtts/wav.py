"""WAV helpers for what GLM-TTS returns: 16-bit PCM, base64 in a JSON body.

PCM is little-endian int16, as stored in the file. The stdlib `wave` module converts to and from
native byte order, so these helpers assume a little-endian host (x86, ARM), as the project does.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import wave
from collections.abc import Sequence
from dataclasses import dataclass

SAMPLE_WIDTH = 2  # bytes per sample: 16-bit PCM, the only format upstream writes
# What `wave` lets escape on malformed input: besides wave.Error, a short read (EOFError,
# struct.error), a chunk seek past its end (RuntimeError) and bad sizes (ValueError, OverflowError).
_PARSE_ERRORS = (wave.Error, EOFError, struct.error, RuntimeError, OSError, ValueError, OverflowError)


class WavError(ValueError):
    """The bytes are not a WAV these helpers accept, or WAVs that must match do not."""


@dataclass(frozen=True, kw_only=True)
class WavAudio:
    sample_rate: int  # frames per second
    channels: int
    sample_width: int  # bytes per sample; always SAMPLE_WIDTH from read_wav
    frames: int
    pcm: bytes  # interleaved little-endian int16 samples, frames * channels * sample_width bytes

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


def _write(pcm: bytes, *, sample_rate: int, channels: int) -> bytes:
    if sample_rate <= 0:
        raise WavError(f"sample rate must be positive, got {sample_rate}")
    if len(pcm) % (SAMPLE_WIDTH * channels):
        raise WavError(f"PCM length {len(pcm)} is not a whole number of {channels}-channel 16-bit frames")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(SAMPLE_WIDTH)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return out.getvalue()


def wav_header(sample_rate: int, data_size: int) -> bytes:
    """The 44-byte RIFF/WAVE header of mono 16-bit PCM at `sample_rate` holding `data_size` bytes of
    samples: the header `write_wav` writes for them, byte for byte. 0xFFFFFFFF for an unknown size
    (a streamed WAV) is written in both size fields as it is."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, SAMPLE_WIDTH * sample_rate, SAMPLE_WIDTH, 8 * SAMPLE_WIDTH)
    riff = data_size if data_size == 0xFFFFFFFF else 4 + (8 + len(fmt)) + 8 + data_size
    return b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + (
        b"data" + struct.pack("<I", data_size))


def write_wav(pcm: bytes, sample_rate: int) -> bytes:
    """A complete mono 16-bit WAV file of `pcm` (little-endian int16 samples).

    Raises WavError if `sample_rate` is not positive or `pcm` has an odd length.
    """
    return _write(pcm, sample_rate=sample_rate, channels=1)


def read_wav(data: bytes) -> WavAudio:
    """Parse a 16-bit PCM WAV file (any channel count).

    Raises WavError, never a `wave`/`EOFError`/`struct` error, for anything else: not a RIFF/WAVE
    file, another sample format or width, or a data chunk shorter than its header claims.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            width = w.getsampwidth()
            if width != SAMPLE_WIDTH:
                raise WavError(f"expected 16-bit PCM, got {8 * width}-bit samples")
            channels, sample_rate, frames = w.getnchannels(), w.getframerate(), w.getnframes()
            pcm = w.readframes(frames)
    except WavError:
        raise
    except _PARSE_ERRORS as exc:
        raise WavError(f"not a valid WAV file: {str(exc) or type(exc).__name__}") from exc
    if sample_rate <= 0:
        raise WavError(f"invalid sample rate {sample_rate}")
    expected = frames * channels * SAMPLE_WIDTH
    if len(pcm) != expected:
        raise WavError(f"truncated WAV: header declares {expected} bytes of audio, found {len(pcm)}")
    return WavAudio(sample_rate=sample_rate, channels=channels, sample_width=width, frames=frames, pcm=pcm)


def duration(data: bytes) -> float:
    """Length in seconds of a WAV file; raises WavError like read_wav."""
    return read_wav(data).duration


def concat(wavs: Sequence[bytes]) -> bytes:
    """One WAV file: the audio of `wavs` in order.

    All must share sample rate, channel count and sample width; otherwise, or if `wavs` is empty,
    raises WavError naming the first mismatch.
    """
    if not wavs:
        raise WavError("nothing to concatenate")
    audios = [read_wav(w) for w in wavs]
    first = audios[0]
    for i, audio in enumerate(audios[1:], start=1):
        for field in ("sample_rate", "channels", "sample_width"):
            got, want = getattr(audio, field), getattr(first, field)
            if got != want:
                raise WavError(f"cannot concatenate: WAV {i} has {field} {got}, WAV 0 has {want}")
    pcm = b"".join(a.pcm for a in audios)
    return _write(pcm, sample_rate=first.sample_rate, channels=first.channels)


def to_base64(data: bytes) -> str:
    """Standard base64 with padding, as upstream's `audio_base64`."""
    return base64.b64encode(data).decode("ascii")


def from_base64(s: str) -> bytes:
    """Decode standard padded base64 strictly: any other character (whitespace included) or
    wrong padding raises WavError."""
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters in `s`
        raise WavError(f"invalid base64: {exc}") from exc
