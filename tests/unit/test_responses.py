"""glmtts.responses: upstream's success answer written without the JSON encoder is the encoder's bytes."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from glmtts.audio import Pcm, encode, join_pcm
from glmtts.errors import dump_json
from glmtts.responses import SUCCESS_MESSAGE, SUCCESS_PREFIX, JoinedSuccess, succeeded, success_json


@given(wav=st.binary(max_size=300), rate=st.one_of(st.none(), st.integers(min_value=0, max_value=10**6)),
       seconds=st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_the_spliced_success_is_byte_for_byte_what_the_encoder_writes(wav: bytes, rate: int | None,
                                                                       seconds: float) -> None:
    expected = dump_json({"success": True, "message": SUCCESS_MESSAGE, "audio_base64": base64.b64encode(wav).decode(),
                          "sample_rate": rate, "generation_time": seconds, "error": None})
    body = success_json(wav, sample_rate=rate, generation_time=seconds)
    assert body == expected
    assert succeeded(200, body[:64]) and body.startswith(SUCCESS_PREFIX)
    assert base64.b64decode(json.loads(body)["audio_base64"], validate=True) == wav


# --- the joined answer, assembled as the pieces come --------------------------------------------------

def _pieces(draw: st.DrawFn) -> list[Pcm]:
    rate = draw(st.sampled_from([8000, 16000, 24000]))
    sizes = draw(st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=6))
    return [Pcm(draw(st.binary(min_size=2 * n, max_size=2 * n)), rate) for n in sizes]


@st.composite
def joins(draw: st.DrawFn) -> tuple[list[Pcm], float, float]:
    pieces = _pieces(draw)
    seconds = draw(st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.03]))
    crossfade = draw(st.booleans())
    return pieces, (seconds if crossfade else 0.0), (0.0 if crossfade else seconds)


@given(join=joins(), seconds=st.floats(min_value=0, max_value=1e4, allow_nan=False))
def test_a_joined_success_assembled_piece_by_piece_is_byte_for_byte_the_whole_one(
        join: tuple[list[Pcm], float, float], seconds: float) -> None:
    pieces, crossfade_s, pause_s = join
    expected = success_json(encode(join_pcm(pieces, crossfade_s=crossfade_s, pause_s=pause_s), "wav"),
                            sample_rate=pieces[0].rate, generation_time=seconds)
    answer = JoinedSuccess(crossfade_s=crossfade_s, pause_s=pause_s)
    for piece in pieces:
        answer.push(piece)
    assert answer.finish(generation_time=seconds) == expected


def test_a_joined_success_refuses_no_pieces_and_mixed_rates() -> None:
    with pytest.raises(ValueError, match="no pieces"):
        JoinedSuccess().finish(generation_time=0.0)
    answer = JoinedSuccess(crossfade_s=0.01)
    answer.push(Pcm(b"\x00\x01" * 100, 24000))
    with pytest.raises(ValueError, match="one sample rate"):
        answer.push(Pcm(b"\x00\x01" * 100, 16000))
    with pytest.raises(ValueError, match="must be Pcm"):
        JoinedSuccess().push(b"\x00\x01")  # type: ignore[arg-type]
