"""The emulator answers every case of UPSTREAM_API.md exactly as upstream would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.contract_cases import CASES, Case, run_step
from tests.support import Service, emulator, get_json, http

# One worker runs the whole module, so its module-scoped fixture starts once.
pytestmark = pytest.mark.xdist_group("test_emulator_contract")


@pytest.fixture(scope="module")
def server() -> Iterator[Service]:
    with emulator() as service:
        yield service


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_contract(server: Service, case: Case) -> None:
    for step in case.steps:
        run_step(server.url, step, http)


def test_upstream_semaphore_figures(server: Service) -> None:
    body = get_json(server.url + "/api/v1/stats/concurrency")
    assert body["config"]["concurrency"] == {"short_text": 10, "long_text": 3, "threshold": 200}
    assert body["config"]["timeout"] == {"short_text": 60, "medium_text": 300, "long_text": 600}
    assert body["stats"]["short_text"]["limit"] == 10 and body["stats"]["long_text"]["limit"] == 3
