"""Answers stream through the sidecar: its peak memory does not grow with what it relays."""

from __future__ import annotations

import pytest

from bench.stream_memory import measure

# A memory measurement: runs in the "serial" xdist group (tests/conftest.py), never beside the
# suite's other heavy or timing-sensitive tests.
pytestmark = pytest.mark.xdist_group("serial")


def test_peak_memory_stays_flat_while_20_clients_receive_5_mb_each() -> None:
    # At time scale 0.01 an answer takes long enough that the emulator's CPU work (a 5 MB WAV each)
    # stays well inside its emulated 600 s timeout on a busy machine; 0.002 left a few tenths of a second.
    result = measure(clients=20, chars=360, time_scale=0.01)
    print(result)
    assert result["answer_bytes"] > 4_500_000
    # Holding answers whole would add up to 20 x 5 MB; streaming adds buffers, not answers.
    assert result["peak_growth_kib"] * 1024 < result["total_bytes"] / 8, result
