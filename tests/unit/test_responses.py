"""glmtts.responses: upstream's success answer written without the JSON encoder is the encoder's bytes."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from glmtts.errors import dump_json
from glmtts.responses import SUCCESS_MESSAGE, SUCCESS_PREFIX, succeeded, success_json


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
