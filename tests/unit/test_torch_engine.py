from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from glmtts.emulator import torch_engine
from glmtts.emulator.engine import SynthesisError, SynthesisJob
from glmtts.emulator.torch_engine import TorchEngine, TorchEngineConfig, torch_available

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]  # subprocesses import glmtts from this checkout

CONFIG = TorchEngineConfig()


def job(
    *, seed: int = 42, units: float = 10.0, sample_rate: int = 24000, text: str = "你好，世界"
) -> SynthesisJob:
    return SynthesisJob(
        text=text,
        units=units,
        sample_rate=sample_rate,
        use_phoneme=False,
        seed=seed,
        sample_method="topk",
        sampling=25,
        beam_size=1,
        prompt_text="参考音频的文本",
        use_cache=True,
    )


def llama_parameters(c: TorchEngineConfig) -> int:
    h, inter = c.hidden_size, c.intermediate_size
    assert inter is not None
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # q/k/v/o, gate/up/down, two RMSNorms
    return 2 * c.vocab_size * h + c.num_layers * per_layer + h  # embeddings, lm_head, final norm


def read_wav(data: bytes) -> tuple[int, int, int, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()


@pytest.fixture
async def engine() -> AsyncIterator[TorchEngine]:
    e = TorchEngine(CONFIG)
    await e.load(sample_rate=24000, use_phoneme=False)
    yield e
    await e.unload()


@pytest.mark.parametrize("rate", [24000, 32000])
async def test_wav_lasts_as_long_as_the_generated_tokens(rate: int) -> None:
    e = TorchEngine(CONFIG)
    await e.load(sample_rate=rate, use_phoneme=False)
    data = await e.synthesize(job(sample_rate=rate, units=10.0))
    n = len(e.last_generated_tokens)
    assert n == 60  # round(6.0 tokens/unit × 10 units)
    assert read_wav(data) == (1, 2, rate, round(n / 25 * rate))


async def test_decode_really_ran(engine: TorchEngine) -> None:
    await engine.synthesize(job(units=3.5))
    tokens = engine.last_generated_tokens
    assert len(tokens) == 21
    assert all(0 <= t < CONFIG.vocab_size and t != 2 for t in tokens)  # never EOS
    assert len(set(tokens)) > 1
    assert engine.parameter_count == llama_parameters(CONFIG)


async def test_same_seed_same_bytes_other_seed_other_tokens(engine: TorchEngine) -> None:
    first = await engine.synthesize(job(seed=7))
    tokens = engine.last_generated_tokens
    assert await engine.synthesize(job(seed=7)) == first
    assert engine.last_generated_tokens == tokens
    assert await engine.synthesize(job(seed=8)) != first
    assert engine.last_generated_tokens != tokens


async def test_weights_are_the_same_in_every_load() -> None:
    outputs = []
    for _ in range(2):
        e = TorchEngine(CONFIG)
        await e.load(sample_rate=24000, use_phoneme=False)
        outputs.append((await e.synthesize(job()), e.last_generated_tokens))
    assert outputs[0] == outputs[1]


async def test_token_count_is_clamped() -> None:
    e = TorchEngine(replace(CONFIG, max_new_tokens=5))
    await e.load(sample_rate=24000, use_phoneme=False)
    await e.synthesize(job(units=50.0))
    assert len(e.last_generated_tokens) == 5
    await e.synthesize(job(units=0.0))
    assert len(e.last_generated_tokens) == 1


async def test_not_loaded_then_unloaded_raises(engine: TorchEngine) -> None:
    with pytest.raises(SynthesisError, match="model not loaded"):
        await TorchEngine(CONFIG).synthesize(job())
    await engine.unload()
    assert engine.parameter_count is None
    with pytest.raises(SynthesisError, match="model not loaded"):
        await engine.synthesize(job())


async def test_reload_with_another_sample_rate(engine: TorchEngine) -> None:
    await engine.synthesize(job())
    await engine.load(sample_rate=32000, use_phoneme=True)
    assert engine.describe()["sample_rate"] == 32000
    assert engine.describe()["use_phoneme"] is True
    assert read_wav(await engine.synthesize(job(sample_rate=32000)))[2] == 32000


async def test_concurrent_requests_complete_and_match_sequential(engine: TorchEngine) -> None:
    sequential = [await engine.synthesize(job(seed=s, units=u)) for s, u in ((1, 12.0), (2, 8.0))]
    concurrent = await asyncio.gather(
        engine.synthesize(job(seed=1, units=12.0)), engine.synthesize(job(seed=2, units=8.0))
    )
    assert list(concurrent) == sequential


async def test_torch_errors_become_synthesis_errors(
    engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: object) -> tuple[int, ...]:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(torch_engine, "_decode", fail)
    with pytest.raises(SynthesisError, match="CUDA out of memory"):
        await engine.synthesize(job())


async def test_event_loop_keeps_running_during_a_decode(engine: TorchEngine) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await engine.synthesize(job(units=20.0))
    ticker.cancel()
    assert ticks > 10


def test_describe_and_glmtts_shape() -> None:
    big = TorchEngineConfig.glmtts_size()
    assert (big.device, big.dtype, big.intermediate_size) == ("cuda", "bfloat16", 5632)
    assert 1.35e9 < llama_parameters(big) < 1.37e9
    d = TorchEngine(CONFIG).describe()
    assert d["engine"] == "torch" and d["loaded"] is False and d["parameter_count"] is None
    assert CONFIG.intermediate_size == 4 * CONFIG.hidden_size
    assert torch_available()


@pytest.mark.parametrize(
    "bad",
    [{"dtype": "float64"}, {"device": "tpu"}, {"num_heads": 3}, {"tokens_per_unit": 0.0}, {"vocab_size": 3}],
)
def test_config_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TorchEngineConfig(**bad)  # type: ignore[arg-type]


def test_prompt_ids_are_deterministic_and_fixed_length() -> None:
    short, long = CONFIG.prompt_ids("ab"), CONFIG.prompt_ids("x" * 1000 + "end")
    assert len(short) == len(long) == CONFIG.prompt_tokens == 150
    assert short == CONFIG.prompt_ids("ab") and short[:2] * 75 == short
    assert long[-3:] == CONFIG.prompt_ids("end")[:3]
    assert min(short + long) >= 3 and max(short + long) < CONFIG.vocab_size


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, glmtts.emulator.torch_engine; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


EXIT_SCRIPT = """
import asyncio, atexit, time
atexit.register(lambda: print(f"exit took {time.monotonic() - t0:.3f}"))  # runs after the engine's hook
from glmtts.emulator.torch_engine import TorchEngine
from glmtts.emulator.engine import SynthesisJob

async def main():
    global t0
    e = TorchEngine()
    await e.load(sample_rate=24000, use_phoneme=False)
    job = SynthesisJob(text="long", units=680.0, sample_rate=24000, use_phoneme=False, seed=1,
                       sample_method="ras", sampling=25, beam_size=1, prompt_text="", use_cache=True)
    try:
        await asyncio.wait_for(e.synthesize(job), 0.3)  # ~4000 tokens: seconds of decoding
    except TimeoutError:
        pass
    t0 = time.monotonic()

asyncio.run(main())
"""


def test_exit_does_not_wait_for_or_crash_on_a_decode_in_flight() -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "terminate called" not in done.stderr
    assert float(done.stdout.split()[-1]) < 1.0
