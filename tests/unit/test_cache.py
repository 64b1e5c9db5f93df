"""The result cache's bookkeeping (LRU by bytes, TTL on an injected clock, generations, keys) and
its single flight (one synthesis for identical requests; failures and cancellations)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from glmtts.contract import TTSRequest
from glmtts.form import UploadedFile
from scheduler.config import CacheConfig
from scheduler.runtime.cache import CachedAnswer, ResultCache, StoppedWaiting, request_key
from scheduler.runtime.cache_disk import FORMAT_VERSION, DiskCopy
from scheduler.runtime.prompts import PromptCatalogue, parse_prompt_list


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


async def test_a_waiter_stops_at_its_own_time_while_the_run_goes_on_for_the_others() -> None:
    c = cache()
    gate = asyncio.Event()

    async def run() -> str:
        await gate.wait()
        return "audio"

    (first, _), (hurried, _) = c.flight("k", run), c.flight("k", run)
    leader = asyncio.ensure_future(first.result())
    with pytest.raises(StoppedWaiting):
        await hurried.result(within=0.01)
    with pytest.raises(StoppedWaiting):
        await hurried.result(within=-5.0)  # already past: at once
    assert not first.task.done() and not leader.done() and c.in_flight == 1
    gate.set()
    assert await leader == "audio" and await hurried.result(within=1.0) == "audio"


async def test_a_bounded_waiter_gets_the_runs_own_failure_as_it_is() -> None:
    c = cache()
    failure = TimeoutError("the run's own timeout")

    async def run() -> str:
        raise failure

    flight, _ = c.flight("k", run)
    with pytest.raises(TimeoutError) as caught:
        await flight.result(within=5.0)
    assert caught.value is failure and not isinstance(caught.value, StoppedWaiting)


# --- the prompt's configuration in the key ---------------------------------------------------------


def prompt_list(**configs: object) -> bytes:
    return json.dumps({"success": True, "prompts": [{"index": i, "config": c} for i, c in configs.items()]}).encode()


def test_a_prompt_list_gives_a_digest_per_index_that_follows_its_config() -> None:
    a = {"prompt_audio_path": "a.wav", "prompt_text": "hello"}
    first = parse_prompt_list(prompt_list(exampleA=a, exampleB={"prompt_audio_path": "b.wav", "prompt_text": "b"}))
    assert set(first) == {"exampleA", "exampleB"} and first["exampleA"] != first["exampleB"]
    reordered = parse_prompt_list(prompt_list(exampleA=dict(reversed(a.items()))))
    assert reordered["exampleA"] == first["exampleA"]  # the same config, however its keys are ordered
    changed = parse_prompt_list(prompt_list(exampleA={**a, "prompt_text": "hello!"}))
    assert changed["exampleA"] != first["exampleA"]
    assert parse_prompt_list(b'{"prompts": [{"index": "bare"}]}') == {"bare": None}


@pytest.mark.parametrize("body", [b"", b"[]", b'{"prompts": 3}', b'{"prompts": [{"index": 7}]}',
                                  b'{"prompts": ["exampleA"]}', b"\xff\xfe", b'{"other": []}'])
def test_an_unreadable_prompt_list_is_refused(body: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        parse_prompt_list(body)


async def test_the_catalogue_keeps_each_digest_and_its_former_api() -> None:
    answers: list[object] = [{"exampleA": "d1", "exampleB": None}, None, {"exampleA": "d2"}, {"plain"}]

    async def fetch() -> object:
        return answers.pop(0)

    catalogue = PromptCatalogue(fetch)  # type: ignore[arg-type]
    assert catalogue.indexes is None and catalogue.digest("exampleA") is None
    await catalogue.refresh()
    assert catalogue.indexes == {"exampleA", "exampleB"} and catalogue.digest("exampleA") == "d1"
    assert catalogue.digest("exampleB") is None and catalogue.digest("nope") is None
    await catalogue.refresh()  # no backend answered: what it knew stays
    assert catalogue.digest("exampleA") == "d1"
    catalogue.invalidate()
    assert not await catalogue.has("exampleC")  # an index it does not list: refreshed
    assert catalogue.indexes == {"exampleA"} and catalogue.digest("exampleA") == "d2"
    await catalogue.refresh()  # a fetch that knows indexes only
    assert catalogue.indexes == {"plain"} and catalogue.digest("plain") is None


def test_the_prompts_digest_changes_the_key() -> None:
    key = request_key(BASE, tenant="t", generation=(0, 0), prompt_config="d1")
    assert request_key(BASE, tenant="t", generation=(0, 0), prompt_config="d1") == key
    assert request_key(BASE, tenant="t", generation=(0, 0), prompt_config="d2") != key


# --- the disk copy ---------------------------------------------------------------------------------


def hexkey(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


async def on_disk(tmp_path: Path, clock: Clock, wall: Clock, **settings: object) -> tuple[ResultCache, DiskCopy]:
    """A cache that keeps its copy under ``tmp_path`` and has read back what was there (a start)."""
    c = cache(clock, **settings)
    disk = DiskCopy(tmp_path, wall=wall)
    loaded = await disk.load(max_bytes=c.config.max_bytes, ttl_s=c.config.ttl_s)
    c.keep_copy(disk, [(e.key, e.answer, e.index, e.age_s) for e in loaded])
    return c, disk


def files(directory: Path) -> dict[str, int]:
    return {p.name.removesuffix(".entry"): p.stat().st_size for p in directory.iterdir()}


async def test_entries_survive_a_restart_with_their_age_and_order(tmp_path: Path) -> None:
    clock, wall = Clock(), Clock()
    wall.now = 1000.0
    c, disk = await on_disk(tmp_path, clock, wall)
    put(c, hexkey("old"), 30, "a")
    wall.now += 4.0
    assert c.put(hexkey("new"), answer(20, b"y"), index=None, generation=c.generation(None))
    await disk.close()
    assert set(files(tmp_path)) == {hexkey("old"), hexkey("new")}
    wall.now += 5.0  # 9 s after "old" was made, 5 s after "new"
    again, disk = await on_disk(tmp_path, Clock(), wall)
    assert again.get(hexkey("new")) == answer(20, b"y") and (again.entries, again.bytes) == (2, 50)
    assert again.get(hexkey("old")) is not None
    clock_then = again._clock
    assert isinstance(clock_then, Clock)
    clock_then.now = 1.0  # "old" reaches its 10 s ttl a second after the restart; "new" does not
    assert again.get(hexkey("old")) is None and again.get(hexkey("new")) is not None
    await disk.flush()
    assert set(files(tmp_path)) == {hexkey("new")}  # the expired entry's file went with it
    await disk.close()


async def test_an_invalidated_index_or_a_clear_deletes_the_files(tmp_path: Path) -> None:
    clock, wall = Clock(), Clock()
    c, disk = await on_disk(tmp_path, clock, wall)
    put(c, hexkey("a1"), 10, "a")
    put(c, hexkey("b1"), 10, "b")
    await disk.close()
    # After a restart the write counts start at zero again: the entry of "a" read back must go
    # with the first write to "a", or a key made under generation 1 before could be served again.
    c, disk = await on_disk(tmp_path, clock, wall)
    c.bump("a")
    await disk.flush()
    assert set(files(tmp_path)) == {hexkey("b1")}
    c.bump_all()
    await disk.flush()
    assert files(tmp_path) == {}
    await disk.close()


async def test_entries_made_under_a_later_generation_are_not_read_back(tmp_path: Path) -> None:
    c, disk = await on_disk(tmp_path, Clock(), Clock())
    c.bump("a")
    put(c, hexkey("after-a-write"), 10, "a")
    put(c, hexkey("b"), 10, "b")
    await disk.close()
    again, disk = await on_disk(tmp_path, Clock(), Clock())
    assert again.get(hexkey("after-a-write")) is None and again.get(hexkey("b")) is not None
    await disk.flush()
    assert set(files(tmp_path)) == {hexkey("b")}
    await disk.close()


def corrupt(directory: Path) -> dict[str, bytes]:
    """Files that must never be served, by name (one valid header template, each broken once)."""
    def entry(**changes: object) -> bytes:
        header = {"v": FORMAT_VERSION, "key": hexkey("x"), "status": 200, "content_type": "application/json",
                  "created_at": 0.0, "index": "a", "generation": [0, 0], "size": 3, **changes}
        return json.dumps(header).encode() + b"\n" + b"abc"

    bad = {
        hexkey("garbage"): b"\x00\xffnot json at all",
        hexkey("version"): entry(v=FORMAT_VERSION + 1),
        hexkey("short"): entry(size=4),
        hexkey("no-header-end"): b'{"v": 1' + b" " * 20000,
        hexkey("status"): entry(status="200"),
        hexkey("index"): entry(index=5),
        hexkey("created"): entry(created_at="yesterday"),
    }
    for name, data in bad.items():
        fixed = data.replace(hexkey("x").encode(), name.encode())
        (directory / f"{name}.entry").write_bytes(fixed)
    (directory / f"{hexkey('elsewhere')}.entry").write_bytes(entry())  # its header names another key
    (directory / f".{hexkey('crashed')}.entry.tmp").write_bytes(b"half")
    return bad


async def test_corrupt_foreign_and_expired_files_are_removed_never_served(tmp_path: Path) -> None:
    bad = corrupt(tmp_path)
    wall = Clock()
    wall.now = 100.0
    c, disk = await on_disk(tmp_path, Clock(), wall)
    put(c, hexkey("good"), 10, "a")
    await disk.close()
    (tmp_path / "README").write_text("not ours: left alone")
    stale = dict(json.loads((tmp_path / f"{hexkey('good')}.entry").read_bytes().split(b"\n")[0]))
    assert stale["created_at"] == 100.0 and stale["index"] == "a" and stale["status"] == 200
    c, disk = await on_disk(tmp_path, Clock(), wall)
    assert c.entries == 1 and all(c.get(name) is None for name in bad)
    assert set(files(tmp_path)) == {hexkey("good"), "README"}
    await disk.close()
    wall.now = 110.0  # ttl_s 10: expired by wall time while the sidecar was down
    c, disk = await on_disk(tmp_path, Clock(), wall)
    assert c.entries == 0 and set(files(tmp_path)) == {"README"}
    await disk.close()


async def test_the_byte_bound_holds_on_disk_and_a_smaller_one_keeps_the_newest(tmp_path: Path) -> None:
    clock, wall = Clock(), Clock()
    c, disk = await on_disk(tmp_path, clock, wall)
    for i in range(40):
        wall.now = float(i)
        put(c, hexkey(f"k{i}"), 7 + i % 5)
    await disk.flush()
    on = files(tmp_path)
    assert set(on) == {k for k in (hexkey(f"k{i}") for i in range(40)) if k in c._entries}
    bodies = sum(len(c._entries[k].answer.body) for k in on)
    assert bodies == c.bytes <= 100
    await disk.close()
    small, disk = await on_disk(tmp_path, Clock(), wall, max_bytes=25)
    await disk.flush()
    kept = set(files(tmp_path))
    assert kept == set(small._entries) and small.bytes <= 25
    assert hexkey("k39") in kept and hexkey("k38") in kept  # the newest: 11 + 10 bytes
    await disk.close()


async def test_a_disabled_cache_empties_its_disk_copy(tmp_path: Path) -> None:
    c, disk = await on_disk(tmp_path, Clock(), Clock())
    put(c, hexkey("k"), 10)
    await disk.close()
    off, disk = await on_disk(tmp_path, Clock(), Clock(), enabled=False)
    await disk.flush()
    assert off.entries == 0 and files(tmp_path) == {}
    await disk.close()
