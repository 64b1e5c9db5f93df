"""An engine that really decodes: a random-weight Llama shaped like GLM-TTS's first stage.

GLM-TTS's first stage is a Llama decoder that emits speech tokens, 25 per second of audio, by
sampling (top-k) with HF `generate` at batch 1, one request per thread of a pool. This engine runs
that same loop on a `transformers.LlamaForCausalLM` with deterministic random weights, so service
time, memory and contention are real, and renders the audio with `voice.render_speech` at the
length the generated tokens stand for. `sample_method` (ras/topk) and `beam_size` are accepted but
decoding is always top-k sampling with `sampling` as k.

torch and transformers are the optional `torch` extra: importing this module does not import them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import hashlib
import importlib
import importlib.util
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from glmtts.emulator.engine import SynthesisError, SynthesisJob
from glmtts.emulator.voice import render_speech

SPEECH_TOKENS_PER_SECOND = 25.0
_WEIGHT_SEED = 0  # fixed: every load of one config on one device/dtype gets the same weights
_INIT_STD = 0.02  # Llama's initializer_range
_PAD_ID, _BOS_ID, _EOS_ID = 0, 1, 2  # never used as prompt ids; EOS is never sampled
_FIRST_PROMPT_ID = 3
_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")

_EXIT_GRACE_S = 2.0  # how long interpreter exit waits for decodes to stop at their next token

_T = TypeVar("_T")
_exiting = threading.Event()
_workers: set[threading.Thread] = set()
_workers_lock = threading.Lock()


def torch_available() -> bool:
    """Whether the optional `torch` extra (torch and transformers) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


@dataclass(frozen=True, kw_only=True)
class TorchEngineConfig:
    """Model shape and decoding budget. The defaults are tiny, for CPUs and tests."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None  # None: 4 × hidden_size
    vocab_size: int = 1024
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    dtype: str = "float32"  # one of _DTYPES
    tokens_per_unit: float = 6.0  # 0.24 s of speech per text cost unit × 25 tokens/s
    prompt_tokens: int = 150
    max_new_tokens: int = 4096
    threads: int = 1  # torch intra-op threads per request on CPU

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens < 1 or self.threads < 1:
            raise ValueError("max_new_tokens and threads must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.vocab_size <= _FIRST_PROMPT_ID:
            raise ValueError(f"vocab_size must be > {_FIRST_PROMPT_ID}, got {self.vocab_size}")
        if not self.tokens_per_unit > 0:
            raise ValueError(f"tokens_per_unit must be > 0, got {self.tokens_per_unit}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @classmethod
    def glmtts_size(cls, *, device: str = "cuda") -> TorchEngineConfig:
        """GLM-TTS's first-stage shape: 1.36 B parameters in bf16 (for GPU machines)."""
        return cls(
            hidden_size=2048,
            num_layers=24,
            num_heads=16,
            intermediate_size=5632,
            vocab_size=32000,
            dtype="bfloat16",
            device=device,
        )

    def new_tokens(self, units: float) -> int:
        """Speech tokens to generate for a text of `units` cost units."""
        return min(max(round(self.tokens_per_unit * units), 1), self.max_new_tokens)

    def prompt_ids(self, text: str) -> list[int]:
        """Exactly `prompt_tokens` ids derived from `text`: one per character, keeping the end of
        a long text and repeating a short one (no padding, so no attention mask games)."""
        chars = text[-self.prompt_tokens :] or " "
        ids = [_char_id(c, self.vocab_size) for c in chars]
        return (ids * -(-self.prompt_tokens // len(ids)))[: self.prompt_tokens]


def _char_id(char: str, vocab_size: int) -> int:
    digest = hashlib.blake2b(char.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return _FIRST_PROMPT_ID + int.from_bytes(digest, "little") % (vocab_size - _FIRST_PROMPT_ID)


@dataclass(frozen=True, kw_only=True)
class _Loaded:
    torch: Any
    transformers: Any
    model: Any
    sample_rate: int
    use_phoneme: bool
    parameter_count: int


class TorchEngine:
    """Real autoregressive decoding on a random-weight Llama (see the module docstring).

    Every load, unload and synthesis runs in its own daemon thread, so the event loop never
    blocks, concurrent requests decode in parallel as in upstream's thread pool, and a process
    that exits does not wait for a decode in flight (nothing cancels one, as upstream).
    """

    name = "torch"

    def __init__(self, config: TorchEngineConfig | None = None) -> None:
        self.config = config or TorchEngineConfig()
        self._loaded: _Loaded | None = None
        self._lifecycle = asyncio.Lock()  # load and unload do not interleave
        self.last_generated_tokens: tuple[int, ...] = ()  # speech tokens of the latest finished decode

    @property
    def parameter_count(self) -> int | None:
        """Parameters of the loaded model; None when nothing is loaded."""
        return None if self._loaded is None else self._loaded.parameter_count

    def describe(self) -> dict[str, object]:
        loaded = self._loaded
        return {
            "engine": self.name,
            "hidden_size": self.config.hidden_size,
            "num_layers": self.config.num_layers,
            "num_heads": self.config.num_heads,
            "intermediate_size": self.config.intermediate_size,
            "vocab_size": self.config.vocab_size,
            "device": self.config.device,
            "dtype": self.config.dtype,
            "tokens_per_unit": self.config.tokens_per_unit,
            "prompt_tokens": self.config.prompt_tokens,
            "max_new_tokens": self.config.max_new_tokens,
            "threads": self.config.threads,
            "loaded": loaded is not None,
            "sample_rate": None if loaded is None else loaded.sample_rate,
            "use_phoneme": None if loaded is None else loaded.use_phoneme,
            "parameter_count": self.parameter_count,
        }

    async def load(self, *, sample_rate: int, use_phoneme: bool) -> None:
        async with self._lifecycle:
            # Drop the old model before building the new one, as upstream does: peak memory stays
            # one model, and a request arriving mid-swap fails with "model not loaded".
            await self._release()
            self._loaded = await _in_daemon_thread(
                lambda: _build(self.config, sample_rate=sample_rate, use_phoneme=use_phoneme)
            )

    async def unload(self) -> None:
        async with self._lifecycle:
            await self._release()

    async def synthesize(self, job: SynthesisJob) -> bytes:
        loaded = self._loaded
        if loaded is None:
            raise SynthesisError("model not loaded")
        return await _in_daemon_thread(lambda: self._synthesize_blocking(loaded, job))

    async def _release(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        torch = loaded.torch
        del loaded  # a decode in flight keeps its own reference until it finishes
        await _in_daemon_thread(lambda: _free_memory(torch, self.config.device))

    def _synthesize_blocking(self, loaded: _Loaded, job: SynthesisJob) -> bytes:
        try:
            tokens = _decode(loaded, self.config, job)
        except Exception as e:
            raise SynthesisError(str(e) or type(e).__name__) from e
        self.last_generated_tokens = tokens
        return render_speech(
            text=job.text,
            units=job.units,
            sample_rate=job.sample_rate,
            seed=job.seed,
            duration_s=len(tokens) / SPEECH_TOKENS_PER_SECOND,
        )


def _build(config: TorchEngineConfig, *, sample_rate: int, use_phoneme: bool) -> _Loaded:
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")
    if config.device == "cpu":
        torch.set_num_threads(config.threads)
    model_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.prompt_tokens + config.max_new_tokens,
        pad_token_id=_PAD_ID,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
    )
    dtype = getattr(torch, config.dtype)
    # Built directly on the device in the target dtype, so a 1.36 B model never exists in fp32:
    # many backend processes may load on one GPU at once. (`_from_config` switches torch's
    # default dtype for the duration, which only matters to a decode racing a reload.)
    with torch.device(config.device):
        model = transformers.LlamaForCausalLM._from_config(model_config, dtype=dtype)
    _init_weights(torch, model, config.device)
    model.eval()
    return _Loaded(
        torch=torch,
        transformers=transformers,
        model=model,
        sample_rate=sample_rate,
        use_phoneme=use_phoneme,
        parameter_count=sum(p.numel() for p in model.parameters()),
    )


def _init_weights(torch: Any, model: Any, device: str) -> None:
    # Llama's own scheme (normal(0, 0.02) for matrices, ones for RMSNorm), redrawn from a private
    # generator: torch.manual_seed would reseed the global RNG under concurrent decodes.
    generator = torch.Generator(device=device).manual_seed(_WEIGHT_SEED)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, _INIT_STD, generator=generator)


def _free_memory(torch: Any, device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _decode(loaded: _Loaded, config: TorchEngineConfig, job: SynthesisJob) -> tuple[int, ...]:
    torch = loaded.torch
    if config.device == "cpu":
        torch.set_num_threads(config.threads)  # OpenMP's setting is per thread
    n = config.new_tokens(job.units)
    prompt = config.prompt_ids(job.prompt_text + job.text)
    ids = torch.tensor([prompt], dtype=torch.long, device=config.device)
    generator = torch.Generator(device=config.device).manual_seed(job.seed % 2**63)
    sampler = _seeded_top_k(torch, generator, k=job.sampling)
    with torch.inference_mode():
        out = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=job.sampling,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=_PAD_ID,
            logits_processor=loaded.transformers.LogitsProcessorList([sampler]),
        )
    return tuple(int(t) for t in out[0, len(prompt) :].tolist())


def _seeded_top_k(torch: Any, generator: Any, *, k: int) -> Callable[[Any, Any], Any]:
    """A logits processor that samples the next token itself, top-k, from a per-request generator,
    and leaves only that token possible.

    `generate` samples from torch's global RNG, which every concurrent decode shares; seeding it
    would need a lock around the whole decode and serialise requests that upstream runs in
    parallel. With this processor `generate`'s own draw is forced (one token has probability 1),
    so the output depends on the request's seed alone, whatever runs beside it.
    """

    def sample(input_ids: Any, scores: Any) -> Any:
        if _exiting.is_set():
            raise SynthesisError("interpreter exiting")
        scores = scores.to(torch.float32, copy=True)
        scores[:, _EOS_ID] = float("-inf")  # exactly n tokens, whatever order processors run in
        values, indices = torch.topk(scores, min(k, scores.shape[-1]), dim=-1)
        choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, indices.gather(-1, choice), 0.0)

    return sample


async def _in_daemon_thread(fn: Callable[[], _T]) -> _T:
    # Not asyncio.to_thread: the default executor's threads are joined at interpreter exit, so
    # one long decode would hold up shutdown.
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(set_outcome: Callable[[Any], None], value: object) -> None:
        if not future.done():  # done: the awaiting task was cancelled
            set_outcome(value)

    def work() -> None:
        try:
            result = fn()
        except BaseException as e:
            outcome: tuple[Callable[[Any], None], object] = (future.set_exception, e)
        else:
            outcome = (future.set_result, result)
        finally:
            with _workers_lock:
                _workers.discard(worker)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    worker = threading.Thread(target=work, name="torch-engine", daemon=True)
    with _workers_lock:
        _workers.add(worker)
    worker.start()
    return await future


@atexit.register
def _stop_workers() -> None:
    # Interpreter finalisation kills daemon threads where they stand, and one killed inside torch's
    # C++ aborts the process ("terminate called without an active exception"). Decodes check
    # `_exiting` every token, so they unwind within a step; a load still running after the grace
    # period is left to that fate rather than holding up the exit.
    _exiting.set()
    deadline = time.monotonic() + _EXIT_GRACE_S
    with _workers_lock:
        workers = list(_workers)
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
