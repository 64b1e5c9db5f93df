"""The emulator's contract table, unchanged, through the sidecar: same status, same body."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract_cases import CASES, Case, run_step
from tests.support import Service, admin_headers, backend_details, get_json, http, sidecar_config, start_sidecar

# One worker runs the whole module, so its module-scoped fixture starts once.
pytestmark = pytest.mark.xdist_group("test_sidecar_contract")


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    text, port = sidecar_config(backends=2)
    service = start_sidecar(text, port, Path(tmp_path_factory.mktemp("sidecar")))
    try:
        yield service
    finally:
        service.stop()


def as_operator(sidecar: Service) -> Any:
    """``http`` that presents the admin token on writes other than TTS (prompts, clear_cache), as an
    operator does; everything else goes as any client sends it."""
    def send(method: str, url: str, *, headers: dict[str, str], **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        if method != "GET" and urllib.parse.urlsplit(url).path != "/api/v1/tts":
            headers = {**headers, **admin_headers(sidecar)}
        return http(method, url, headers=headers, **kwargs)

    return send


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_contract(sidecar: Service, case: Case) -> None:
    for step in case.steps:
        run_step(sidecar.url, step, as_operator(sidecar))


def backend_requests(sidecar: Service) -> int:
    backends = backend_details(sidecar)
    return sum(get_json(b["url"] + "/emulator/stats")["tts_received"] for b in backends)


def test_invalid_requests_never_reach_a_backend(sidecar: Service) -> None:
    invalid = [step for case in CASES for step in case.steps if step.path == "/api/v1/tts" and step.status != 200]
    before = backend_requests(sidecar)
    for step in invalid:
        run_step(sidecar.url, step, http)
    assert len(invalid) > 25
    assert backend_requests(sidecar) == before
