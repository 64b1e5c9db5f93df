"""The synthetic engine renders its stand-in voice while the modelled work runs, not after it:
an answer takes the calibrated service time, not that plus the emulator's own CPU cost."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from glmtts.emulator import synthetic
from glmtts.emulator.engine import SynthesisJob
from glmtts.emulator.synthetic import SyntheticEngine
from glmtts.emulator.timing import ServiceModel
from glmtts.emulator.voice import render_speech
from glmtts.text import units

TEXT = "The voice is drawn while the work runs."


def job(seed: int = 7) -> SynthesisJob:
    return SynthesisJob(text=TEXT, units=units(TEXT), sample_rate=24000, use_phoneme=False, seed=seed,
                        sample_method="ras", sampling=25, beam_size=1, prompt_text="", use_cache=True)


async def test_the_voice_is_rendered_while_the_modelled_work_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = SyntheticEngine(ServiceModel(time_scale=0.01))
    rendering = threading.Event()

    def render(**fields: Any) -> bytes:
        rendering.set()
        return render_speech(**fields)

    seen: list[bool] = []

    async def work(seconds: float) -> None:
        # the work ends once the voice has begun (bounded): a voice rendered after the work never has
        seen.append(await asyncio.to_thread(rendering.wait, 5.0))

    monkeypatch.setattr(synthetic, "render_speech", render)
    monkeypatch.setattr(engine.processor, "run", work)
    wav = await engine.synthesize(job())
    assert seen == [True]
    assert wav == render_speech(text=TEXT, units=units(TEXT), sample_rate=24000, seed=7)


async def test_a_synthesis_cancelled_during_its_work_leaves_no_render_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = SyntheticEngine(ServiceModel(time_scale=0.01))
    started = asyncio.Event()

    async def work(seconds: float) -> None:
        started.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr(engine.processor, "run", work)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        task = asyncio.ensure_future(engine.synthesize(job()))
        await asyncio.wait_for(started.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        # the engine serves the next request as usual
        monkeypatch.undo()
        assert await engine.synthesize(job(seed=8)) == render_speech(text=TEXT, units=units(TEXT), sample_rate=24000,
                                                                    seed=8)
    finally:
        loop.set_exception_handler(None)
    assert unhandled == []
