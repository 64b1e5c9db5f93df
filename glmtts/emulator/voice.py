"""Deterministic speech-like audio for the emulator: its length follows the text, like real TTS.

The signal is a string of "syllables", one per SECONDS_PER_UNIT: each a harmonic tone whose pitch
and loudness come from a hash of (seed, text, syllable index), followed by a short silence, with
silent lead-in and lead-out. It is built from cached one-period blocks repeated by bytes
multiplication, never sample by sample, so 80 s at 32 kHz renders in milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from array import array

from glmtts.wav import write_wav

SECONDS_PER_UNIT = 0.22  # one glmtts.text unit: a spoken Chinese character
LEAD_SECONDS = 0.1  # silence before and after the speech
MIN_SECONDS = 0.3  # even an empty text yields a short clip, as real TTS does
PITCH_HZ = (110.0, 260.0)  # range of a syllable's fundamental, male to female voice
DECLINATION = 0.15  # pitch falls by up to this fraction over an utterance, as in speech
PEAK = 12000  # loudest sample, well inside int16
_LEVELS = 8  # loudness steps; quantized so that one-period blocks can be cached
_HARMONICS = (1.0, 0.6, 0.35, 0.2)  # relative amplitude of harmonics 1..4: a buzzy, vowel-ish tone
_VOICED = (0.6, 0.85)  # fraction of a syllable's slot that is voiced; the rest is a gap


def speech_seconds(units: float) -> float:
    """Seconds of speech for `units` glmtts.text cost units: SECONDS_PER_UNIT each, plus lead-in
    and lead-out, at least MIN_SECONDS."""
    return max(MIN_SECONDS, 2 * LEAD_SECONDS + SECONDS_PER_UNIT * units)


@functools.lru_cache(maxsize=4096)
def _period(samples: int, level: int) -> bytes:
    # One period of the tone as little-endian int16; starts and ends at phase 0, so whole periods
    # join without clicks.
    gain = PEAK * (0.45 + 0.55 * level / (_LEVELS - 1)) / sum(_HARMONICS)
    step = 2 * math.pi / samples
    block = array(
        "h",
        (
            round(gain * sum(w * math.sin(k * n * step) for k, w in enumerate(_HARMONICS, start=1)))
            for n in range(samples)
        ),
    )
    if sys.byteorder == "big":
        block.byteswap()
    return block.tobytes()


def _syllable(key: bytes, index: int, *, slot: int, sample_rate: int, fall: float) -> bytes:
    # `slot` frames: a whole number of tone periods, then silence.
    h = int.from_bytes(hashlib.blake2b(key + index.to_bytes(8, "little"), digest_size=8).digest(), "little")
    lo, hi = PITCH_HZ
    pitch = (lo + (hi - lo) * (h & 0xFFFF) / 0xFFFF) * (1 - fall)
    level = (h >> 16) % _LEVELS
    voiced_fraction = _VOICED[0] + (_VOICED[1] - _VOICED[0]) * ((h >> 24) & 0xFF) / 0xFF
    period = max(2, round(sample_rate / pitch))
    periods = int(slot * voiced_fraction) // period
    return _period(period, level) * periods + bytes(2 * (slot - periods * period))


def render_speech(
    *, text: str, units: float, sample_rate: int, seed: int, duration_s: float | None = None
) -> bytes:
    """A complete mono 16-bit WAV at `sample_rate` lasting `duration_s` (default
    speech_seconds(units)), to the nearest frame.

    Deterministic in its arguments; different seeds or texts give different audio (pitch and
    loudness are hashed with blake2b, not Python's per-process `hash`). Raises ValueError for a
    non-positive sample rate or a negative duration.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    seconds = speech_seconds(units) if duration_s is None else duration_s
    if not seconds >= 0:
        raise ValueError(f"duration must be >= 0, got {seconds}")
    total = round(seconds * sample_rate)
    lead = min(round(LEAD_SECONDS * sample_rate), total // 4)
    body = total - 2 * lead
    count = max(1, round(body / (SECONDS_PER_UNIT * sample_rate)))
    key = hashlib.blake2b(
        str(seed).encode() + b"\0" + text.encode("utf-8", "surrogatepass"), digest_size=16
    ).digest()
    parts = [bytes(2 * lead)]
    for i in range(count):
        # Integer bounds spread the remainder, so the slots sum to `body` exactly.
        slot = body * (i + 1) // count - body * i // count
        parts.append(_syllable(key, i, slot=slot, sample_rate=sample_rate, fall=DECLINATION * i / count))
    parts.append(bytes(2 * lead))
    return write_wav(b"".join(parts), sample_rate)
