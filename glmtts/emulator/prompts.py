"""A backend's prompt cache: presets of (prompt audio path, prompt text) by index.

Like upstream's: loaded from a JSON file at start (entries whose audio file does not exist are
dropped), rewritten on every change, and private to the process.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from glmtts.contract import PromptConfig

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
_DEFAULT_TEXT = "他当时还跟线下其他的站姐吵架，然后，打架进局子了。"
DEFAULT_PROMPTS = {
    "exampleA": PromptConfig(prompt_audio_path=str(DATA_DIR / "jiayan_zh.wav"), prompt_text=_DEFAULT_TEXT),
    "exampleB": PromptConfig(prompt_audio_path=str(DATA_DIR / "jiayan_zh1.wav"), prompt_text=_DEFAULT_TEXT),
}


class PromptStore(Mapping[str, PromptConfig]):
    """Prompt presets; ``path=None`` keeps them in memory only (the packaged examples)."""

    def __init__(self, path: Path | None, *, cwd: Path | None = None) -> None:
        self.path = path
        self.cwd = cwd or Path.cwd()
        self._prompts: dict[str, PromptConfig] = {}

    def __getitem__(self, index: str) -> PromptConfig:
        return self._prompts[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prompts)

    def __len__(self) -> int:
        return len(self._prompts)

    def resolve(self, audio_path: str) -> Path:
        """Relative prompt paths are relative to the server's working directory, as upstream."""
        path = Path(audio_path)
        return path if path.is_absolute() else self.cwd / path

    def is_valid(self, config: PromptConfig) -> bool:
        return bool(
            config.prompt_audio_path.strip()
            and config.prompt_text.strip()
            and self.resolve(config.prompt_audio_path).exists()
        )

    def load(self) -> None:
        raw: dict[str, PromptConfig] = dict(DEFAULT_PROMPTS)
        if self.path is not None and self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(loaded, dict):
                    raise ValueError("top level is not an object")
                raw = {}
                for index, entry in loaded.items():
                    if (isinstance(entry, dict) and isinstance(entry.get("prompt_audio_path"), str)
                            and isinstance(entry.get("prompt_text"), str)):
                        raw[index] = PromptConfig(prompt_audio_path=entry["prompt_audio_path"],
                                                  prompt_text=entry["prompt_text"])
                    else:
                        log.warning("prompt cache: entry %r is malformed, skipping", index)
            except (OSError, ValueError) as exc:
                log.error("prompt cache: cannot read %s (%s); using the defaults", self.path, exc)
                raw = dict(DEFAULT_PROMPTS)
        elif self.path is not None:
            self._prompts = dict(DEFAULT_PROMPTS)
            self.save()
        self._prompts = {}
        for index, config in raw.items():
            if self.is_valid(config):
                self._prompts[index] = config
            else:
                log.warning("prompt cache: invalid config for %r (audio %s), skipping",
                            index, config.prompt_audio_path)

    def put(self, index: str, config: PromptConfig) -> None:
        self._prompts[index] = config
        self.save()

    def delete(self, index: str) -> None:
        del self._prompts[index]
        self.save()

    def save(self) -> None:
        """Write atomically: a crash mid-write never leaves a truncated cache file."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {index: config.as_dict() for index, config in self._prompts.items()}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, ensure_ascii=False, indent=4)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
