"""The emulator answers every case of UPSTREAM_API.md exactly as upstream would."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.contract_cases import CASES, Case, run_step
from tests.support import Service, emulator, http


@pytest.fixture(scope="module")
def server() -> Iterator[Service]:
    with emulator() as service:
        yield service


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_contract(server: Service, case: Case) -> None:
    for step in case.steps:
        run_step(server.url, step, http)
