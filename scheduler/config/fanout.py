"""The `fanout` section: a long text split at sentence ends and synthesized on several backends at once.

Pieces run on backend slots that are free when the request starts (never on slots something queued
waits for), are joined in order with a short crossfade or pause, and answer as one request
(scheduler.runtime.fanout; docs/fanout.md). Off by default: joined pieces are not the bytes upstream
would give, and prosody can change at a join, so a drop-in replacement does not split unless asked.
"""

from __future__ import annotations

from pydantic import Field, StrictBool, StrictFloat, StrictInt, model_validator

from backend.settings.base import ConfigSection, Key, raise_if
from glmtts.audio import MAX_JOIN_S

__all__ = ["FanoutConfig"]


class FanoutConfig(ConfigSection):
    """``enabled``: split texts of at least ``min_text_chars`` characters when backends are free
    (a request's ``X-Fanout: on|off`` header decides for itself). ``min_chars``/``max_chars``: a
    piece's length, at least (where whole sentences allow; the last piece may be shorter) and at
    most. ``first_chars``: a streamed answer's first piece is at most this long, so its audio
    starts early. ``pieces_per_slot``: the text is cut into about this many pieces per free slot,
    so a slot whose piece finishes early takes another and a slow piece holds the answer up less;
    each piece adds a join. ``taper``: with two or more pieces per slot, a whole (not streamed)
    answer may instead be cut into one big piece per slot and smaller ones behind them, sized by
    the service-time noise the cost model measures, when that is expected to finish sooner
    (docs/fanout.md). ``crossfade_s``: consecutive pieces overlap by this much; ``pause_s``:
    or this much silence between them instead (one of the two may be above 0)."""

    enabled: StrictBool = False
    min_text_chars: StrictInt = Field(default=100, ge=2)
    min_chars: StrictInt = Field(default=40, ge=1)
    max_chars: StrictInt = Field(default=200, ge=1)
    first_chars: StrictInt = Field(default=20, ge=1)
    pieces_per_slot: StrictInt = Field(default=2, ge=1, le=8)
    taper: StrictBool = True
    crossfade_s: StrictFloat = Field(default=0.01, ge=0.0, le=MAX_JOIN_S)
    pause_s: StrictFloat = Field(default=0.0, ge=0.0, le=MAX_JOIN_S)

    @model_validator(mode="after")
    def _check(self) -> FanoutConfig:
        problems: list[tuple[Key, str]] = []
        if self.max_chars < self.min_chars:
            problems.append((("max_chars",), f"must be at least min_chars ({self.min_chars})"))
        if self.first_chars > self.max_chars:
            problems.append((("first_chars",), f"must be at most max_chars ({self.max_chars})"))
        if self.crossfade_s > 0 and self.pause_s > 0:
            problems.append((("pause_s",), f"join with a crossfade or a pause, not both: crossfade_s is "
                                           f"{self.crossfade_s:g}; set one of them to 0"))
        raise_if(problems)
        return self
