"""The seam between the emulated server and what produces speech.

An engine owns one loaded "model" at a time, keyed like upstream's by (sample_rate, use_phoneme).
The server decides *when* to load (lazily, on the first request, and again whenever the pair
changes); the engine decides how long loading and synthesis take and what audio comes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class SynthesisError(Exception):
    """Inference failed inside the engine; upstream answers 200 with `success: false`."""


@dataclass(frozen=True, kw_only=True)
class SynthesisJob:
    text: str
    units: float  # glmtts.text cost units of `text`
    sample_rate: int
    use_phoneme: bool
    seed: int
    sample_method: str
    sampling: int
    beam_size: int
    prompt_text: str
    use_cache: bool


class Engine(Protocol):
    """What the emulator's HTTP layer needs from a speech engine.

    Called from the event loop. Work that blocks (real decoding) must run in a worker thread,
    as upstream runs inference in a thread pool; like upstream's, it is never cancelled: the
    server shields every `synthesize` call, so a client that goes away does not stop it.
    """

    name: str

    async def load(self, *, sample_rate: int, use_phoneme: bool) -> None:
        """Load (or replace) the model for this configuration; returns once it is usable."""

    async def unload(self) -> None:
        """Drop the loaded model (upstream's clear_cache); the next request loads again."""

    async def synthesize(self, job: SynthesisJob) -> bytes:
        """Return a mono 16-bit PCM WAV at `job.sample_rate`; raise SynthesisError on failure."""
