"""The default engine: calibrated service times, contention inside the process, synthetic voice."""

from __future__ import annotations

import asyncio

from glmtts.emulator.engine import SynthesisJob
from glmtts.emulator.timing import ServiceModel, SharedProcessor
from glmtts.emulator.voice import render_speech


class SyntheticEngine:
    name = "synthetic"

    def __init__(self, model: ServiceModel, *, seed: int = 0) -> None:
        self.model = model
        self.seed = seed
        self.processor = SharedProcessor(model.throughput)
        self._cold = True

    async def load(self, *, sample_rate: int, use_phoneme: bool) -> None:
        await asyncio.sleep(self.model.load_seconds())
        self._cold = True  # a freshly loaded model's first request is slow (measurements/)

    async def unload(self) -> None:
        self._cold = True

    async def synthesize(self, job: SynthesisJob) -> bytes:
        cold, self._cold = self._cold, False
        work = self.model.work_seconds(job.units, seed=self.seed * 1_000_003 + job.seed,
                                        text=job.text, cold=cold)
        await self.processor.run(work)
        return await asyncio.to_thread(
            render_speech, text=job.text, units=job.units, sample_rate=job.sample_rate, seed=job.seed
        )
