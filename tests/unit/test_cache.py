"""The result cache's bookkeeping (LRU by bytes, TTL on an injected clock, generations, keys) and
its single flight (one synthesis for identical requests; failures and cancellations)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from glmtts.contract import TTSRequest
from glmtts.form import UploadedFile
from scheduler.config import CacheConfig
from scheduler.runtime.cache import CachedAnswer, ResultCache, request_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock | None = None, **settings: object) -> ResultCache:
    config = CacheConfig.model_validate({"enabled": True, "max_bytes": 100, "ttl_s": 10.0, **settings})
    return ResultCache(config, clock=clock or Clock())


def answer(size: int, fill: bytes = b"x") -> CachedAnswer:
    return CachedAnswer(status=200, content_type="application/json", body=fill * size)


def put(c: ResultCache, key: str, size: int, index: str | None = "a") -> bool:
    return c.put(key, answer(size), index=index, generation=c.generation(index))


def test_least_recently_used_goes_first_and_bytes_stay_bounded() -> None:
    c = cache()
    assert put(c, "k1", 40) and put(c, "k2", 40)
    assert c.get("k1") is not None  # k2 is now the least recently used
    assert put(c, "k3", 40)
    assert (c.get("k2"), c.bytes, c.entries) == (None, 80, 2)
    assert c.get("k1") is not None and c.get("k3") is not None
    for i in range(50):
        put(c, f"many{i}", 7 + i % 5)
        assert c.bytes <= 100
    assert c.bytes == sum(len(c.get(k).body) for k in [f"many{i}" for i in range(50)] if c.get(k) is not None)


def test_an_answer_larger_than_the_bound_is_not_stored_and_evicts_nothing() -> None:
    c = cache()
    assert put(c, "small", 60)
    assert not put(c, "huge", 101)
    assert c.get("huge") is None and c.get("small") is not None and c.bytes == 60
    assert put(c, "exact", 100)  # exactly the bound fits, once the rest is gone
    assert (c.bytes, c.entries) == (100, 1)


def test_entries_expire_after_ttl() -> None:
    clock = Clock()
    c = cache(clock)
    put(c, "k", 10)
    clock.now = 9.99
    assert c.get("k") is not None
    clock.now = 10.0
    assert c.get("k") is None and (c.bytes, c.entries) == (0, 0)


def test_expired_entries_make_room_before_fresh_ones_go() -> None:
    clock = Clock()
    c = cache(clock)
    put(c, "old", 50)
    clock.now = 5.0
    put(c, "fresh", 40)
    clock.now = 11.0  # "old" expired, "fresh" not
    assert put(c, "new", 50)
    assert c.get("fresh") is not None and c.get("old") is None


def test_a_prompt_write_drops_that_index_only_and_changes_its_keys() -> None:
    c = cache()
    before = c.generation("a")
    put(c, "ka", 10, "a")
    put(c, "kb", 10, "b")
    put(c, "upload", 10, None)
    c.bump("a")
    assert c.generation("a") != before and c.generation("b") == (0, 0)
    assert c.get("ka") is None and c.get("kb") is not None and c.get("upload") is not None
    assert c.bytes == 20
    # An answer begun before the write may be of the old prompt: never stored.
    assert not c.put("late", answer(5), index="a", generation=before)
    c.bump_all()
    assert (c.entries, c.bytes) == (0, 0) and c.generation("b") == (1, 0)


def test_writes_to_ever_new_indexes_keep_the_generations_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("scheduler.runtime.cache.MAX_TRACKED_INDEXES", 3)
    c = cache()
    put(c, "ka", 10, "a")
    old = c.generation("a")
    for index in ("x", "y", "z", "w"):
        c.bump(index)
    assert len(c._generations) <= 3
    assert c.generation("a") != old and c.get("ka") is None  # the global generation moved on


def test_disabled_stores_nothing_and_a_reload_rebounds() -> None:
    c = cache(enabled=False)
    assert not put(c, "k", 1)
    c = cache()
    put(c, "k1", 50)
    put(c, "k2", 50)
    c.configure(CacheConfig(enabled=True, max_bytes=60, ttl_s=10.0))
    assert (c.entries, c.bytes) == (1, 50) and c.get("k2") is not None
    c.configure(CacheConfig(enabled=False))
    assert (c.entries, c.bytes) == (0, 0)


BASE = TTSRequest(input_text="hello", index="exampleA")


@pytest.mark.parametrize("changed", [
    {"input_text": "hello!"}, {"index": "exampleB"}, {"seed": 7}, {"sample_rate": 32000}, {"use_cache": False},
    {"use_phoneme": True}, {"sample_method": "topk"}, {"sampling": 10}, {"beam_size": 2}, {"prompt_text": "x"},
])
def test_every_synthesis_input_changes_the_key(changed: dict[str, object]) -> None:
    key = request_key(BASE, tenant="t", generation=(0, 0))
    assert request_key(replace(BASE, **changed), tenant="t", generation=(0, 0)) != key  # type: ignore[arg-type]


def test_tenant_generation_config_and_upload_bytes_are_in_the_key() -> None:
    key = request_key(BASE, tenant="t", generation=(0, 0))
    assert request_key(BASE, tenant="t", generation=(0, 0)) == key
    assert request_key(BASE, tenant="u", generation=(0, 0)) != key
    assert request_key(BASE, tenant=None, generation=(0, 0)) != key  # shared
    assert request_key(BASE, tenant="t", generation=(0, 1)) != key
    assert request_key(BASE, tenant="t", generation=(1, 0)) != key
    assert request_key(BASE, tenant="t", generation=(0, 0), prompt_config={"prompt_text": "x"}) != key
    assert request_key(BASE, tenant="t", generation=(0, 0), fan_out=2) != key
    audio = UploadedFile(filename="a.wav", content_type=None, data=b"RIFF1")
    upload = TTSRequest(input_text="hello", prompt_text="p", prompt_audio=audio)
    other = replace(upload, prompt_audio=replace(audio, data=b"RIFF2"))
    assert request_key(upload, tenant="t", generation=(0, 0)) != request_key(other, tenant="t", generation=(0, 0))


# --- single flight ---------------------------------------------------------------------------------


async def test_identical_requests_share_one_run() -> None:
    c = cache()
    gate = asyncio.Event()
    runs = 0

    async def run() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return "audio"

    flights = [c.flight("k", run) for _ in range(5)]
    assert [leads for _, leads in flights] == [True, False, False, False, False]
    waiting = [asyncio.ensure_future(flight.result()) for flight, _ in flights]
    await asyncio.sleep(0)
    assert c.in_flight == 1
    gate.set()
    assert await asyncio.gather(*waiting) == ["audio"] * 5
    assert runs == 1 and c.in_flight == 0
    _, leads = c.flight("k", run)  # over: the next one runs again
    assert leads
    await asyncio.sleep(0)


async def test_a_failing_run_fails_every_waiter_and_is_forgotten() -> None:
    c = cache()
    gate = asyncio.Event()
    failure = RuntimeError("backend said no")

    async def run() -> str:
        await gate.wait()
        raise failure

    waiting = [asyncio.ensure_future(c.flight("k", run)[0].result()) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert results == [failure] * 3
    assert c.in_flight == 0 and c.entries == 0


async def test_a_waiter_or_the_first_client_leaving_does_not_stop_the_run() -> None:
    c = cache()
    gate = asyncio.Event()

    async def run() -> str:
        await gate.wait()
        return "audio"

    (first, _), (second, _), (third, _) = (c.flight("k", run) for _ in range(3))
    leader = asyncio.ensure_future(first.result())
    waiter = asyncio.ensure_future(second.result())
    stays = asyncio.ensure_future(third.result())
    await asyncio.sleep(0)
    leader.cancel()
    waiter.cancel()
    await asyncio.gather(leader, waiter, return_exceptions=True)
    assert leader.cancelled() and waiter.cancelled()
    assert not first.task.done() and c.in_flight == 1
    gate.set()
    assert await stays == "audio"
    assert c.in_flight == 0


async def test_close_cancels_what_is_in_flight_and_forgets_it() -> None:
    c = cache()
    flight, _ = c.flight("k", lambda: asyncio.sleep(3600, "never"))
    waiter = asyncio.ensure_future(flight.result())
    await asyncio.sleep(0)
    await c.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert c.in_flight == 0
