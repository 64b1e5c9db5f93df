"""A reload of the tasks section in-process: the sidecar's app under pytest-aiohttp's client, its
backend an emulator app served in the same process and configured as a ``backends.external`` URL.

A new quota applies to the next submit without a restart; a new ``tasks.state_dir`` is reported
as needing a restart and the running store stays where it was opened, tasks and audio included.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from glmtts.emulator.app import Emulator, EmulatorOptions
from glmtts.emulator.prompts import PromptStore
from glmtts.emulator.synthetic import SyntheticEngine
from glmtts.emulator.timing import ServiceModel
from scheduler.config import load_config
from scheduler.http.app import build_app
from tests.inprocess.support import UPSTREAM_TIMEOUT_SCALE

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIME_SCALE = 0.01
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@dataclass
class Sidecar:
    client: TestClient[web.Request, web.Application]
    config_path: Path
    state_dir: Path

    def write_tasks(self, lines: str) -> None:
        """Rewrite the file with ``lines`` (indented) as its tasks section."""
        text = self.config_path.read_text()
        self.config_path.write_text(text[: text.index("tasks:\n")] + "tasks:\n" + lines)

    async def reload(self) -> dict[str, Any]:
        status, body = await answer(await self.client.post("/admin/reload", headers=AUTH))
        assert status == 200, body
        return body

    async def submit(self, text: str = "你好") -> tuple[int, dict[str, Any]]:
        body = urlencode({"input_text": text, "index": "exampleA"}).encode()
        return await answer(await self.client.post("/api/v1/tasks", data=body, headers=FORM))


def emulator() -> Emulator:
    store = PromptStore(None)
    store.load()
    return Emulator(SyntheticEngine(ServiceModel(time_scale=TIME_SCALE)), store,
                    EmulatorOptions(time_scale=UPSTREAM_TIMEOUT_SCALE))


async def answer(resp: ClientResponse) -> tuple[int, Any]:
    async with resp:
        return resp.status, await resp.json()


@pytest.fixture
async def sidecar(aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path) -> Sidecar:
    server = await aiohttp_server(emulator().make_app())
    url = str(server.make_url("")).rstrip("/")
    state_dir = tmp_path / "state"
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"backends:\n  gpus: []\n  external: [{json.dumps(url)}]\n  slots: 1\n"
                    "  health: {interval_s: 0.05, timeout_s: 2.0, start_timeout_s: 30.0}\n"
                    "  warmup: {enabled: false}\n"
                    f"admin: {{token: {TOKEN}}}\n"
                    f"tasks:\n  state_dir: {json.dumps(str(state_dir))}\n  max_per_tenant: 1\n")
    client = await aiohttp_client(build_app(load_config(path), config_path=str(path)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while (await answer(await client.get("/readyz")))[1]["ready_backends"] != 1:
        assert loop.time() < deadline, "the backend did not become ready"
        await asyncio.sleep(0.02)
    return Sidecar(client=client, config_path=path, state_dir=state_dir)


async def finished(sidecar: Sidecar, task_id: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while True:
        status, body = await answer(await sidecar.client.get(f"/api/v1/tasks/{task_id}"))
        assert status == 200, body
        if body["status"] not in ("queued", "running"):
            return body
        assert loop.time() < deadline, f"task {task_id} did not finish: {body}"
        await asyncio.sleep(0.02)


async def test_a_new_task_quota_applies_without_a_restart(sidecar: Sidecar) -> None:
    state = f"  state_dir: {json.dumps(str(sidecar.state_dir))}\n"
    status, first = await sidecar.submit()
    assert status == 202, first
    status, refused = await sidecar.submit()
    assert (status, refused["reason"]) == (429, "task_quota")
    assert "tasks.max_per_tenant allows (1)" in refused["detail"]

    sidecar.write_tasks(state + "  max_per_tenant: 3\n")
    assert await sidecar.reload() == {"reloaded": True, "changed": ["tasks"], "needs_restart": []}
    status, second = await sidecar.submit()
    assert status == 202, second
    # Lowered again below what is stored: the next submit is refused at once.
    sidecar.write_tasks(state + "  max_per_tenant: 2\n")
    assert await sidecar.reload() == {"reloaded": True, "changed": ["tasks"], "needs_restart": []}
    status, refused = await sidecar.submit()
    assert (status, refused["reason"]) == (429, "task_quota")
    assert "tasks.max_per_tenant allows (2)" in refused["detail"]
    for task in (first, second):
        assert (await finished(sidecar, task["task_id"]))["status"] == "succeeded"


async def test_a_new_state_dir_needs_a_restart_and_the_running_store_stays(sidecar: Sidecar,
                                                                           tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    # The quota changes too: it applies, while the directory keeps its running value.
    sidecar.write_tasks(f"  state_dir: {json.dumps(str(elsewhere))}\n  max_per_tenant: 2\n")
    assert await sidecar.reload() == {"reloaded": True, "changed": ["tasks"], "needs_restart": ["tasks.state_dir"]}
    ids = []
    for _ in range(2):  # two stored tasks: the new quota, not the old one of 1
        status, accepted = await sidecar.submit()
        assert status == 202, accepted
        ids.append(accepted["task_id"])
    for task_id in ids:
        assert (await finished(sidecar, task_id))["status"] == "succeeded"
        async with sidecar.client.get(f"/api/v1/tasks/{task_id}/audio") as resp:
            assert resp.status == 200 and (await resp.read())[:4] == b"RIFF"
        assert (sidecar.state_dir / "results" / f"{task_id}.wav").is_file()
    db = sqlite3.connect(sidecar.state_dir / "tasks.sqlite3")
    try:
        assert sorted(row[0] for row in db.execute("SELECT id FROM tasks")) == sorted(ids)
    finally:
        db.close()
    assert not elsewhere.exists()
    # Asked again, it still says so: the running directory is still the old one.
    assert (await sidecar.reload())["needs_restart"] == ["tasks.state_dir"]
