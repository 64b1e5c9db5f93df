"""The default engine: calibrated service times, contention inside the process, synthetic voice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from glmtts.emulator.engine import SynthesisJob
from glmtts.emulator.gpu import GpuShare
from glmtts.emulator.timing import ServiceModel, SharedProcessor
from glmtts.emulator.voice import render_speech


class SyntheticEngine:
    name = "synthetic"

    def __init__(self, model: ServiceModel, *, seed: int = 0, gpu: GpuShare | None = None) -> None:
        self.model = model
        self.seed = seed
        self.processor = SharedProcessor(model.throughput)
        self.gpu = gpu  # other processes on the same GPU slow this one down (None: alone)
        if gpu is not None:
            gpu.on_speed(self.processor.set_speed)
        self._cold = True

    def _on_gpu(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.gpu.busy() if self.gpu is not None else _alone()

    async def load(self, *, sample_rate: int, use_phoneme: bool) -> None:
        async with self._on_gpu():  # a load occupies the GPU for the others, at its own fixed pace
            await asyncio.sleep(self.model.load_seconds())
        self._cold = True  # a freshly loaded model's first request is slow (measurements/)

    async def unload(self) -> None:
        self._cold = True

    async def synthesize(self, job: SynthesisJob) -> bytes:
        cold, self._cold = self._cold, False
        work = self.model.work_seconds(job.units, seed=self.seed * 1_000_003 + job.seed,
                                        text=job.text, cold=cold)
        # The stand-in voice is rendered on the CPU while the modelled GPU work runs: the calibrated
        # service time is a request's whole synthesis, so rendering after it would add the
        # emulator's own CPU cost to every answer (tens of ms at a small time scale).
        render = asyncio.ensure_future(asyncio.to_thread(
            render_speech, text=job.text, units=job.units, sample_rate=job.sample_rate, seed=job.seed
        ))
        try:
            async with self._on_gpu():
                await self.processor.run(work)
        except BaseException:
            render.cancel()  # nobody waits for the voice any more (its thread finishes on its own)
            raise
        return await render


@contextlib.asynccontextmanager
async def _alone() -> AsyncIterator[None]:
    yield
