"""Answers stream through the sidecar: its peak memory does not grow with what it relays."""

from __future__ import annotations

from bench.stream_memory import measure


def test_peak_memory_stays_flat_while_20_clients_receive_5_mb_each() -> None:
    result = measure(clients=20, chars=360)
    print(result)
    assert result["answer_bytes"] > 4_500_000
    # Holding answers whole would add up to 20 x 5 MB; streaming adds buffers, not answers.
    assert result["peak_growth_kib"] * 1024 < result["total_bytes"] / 8, result
