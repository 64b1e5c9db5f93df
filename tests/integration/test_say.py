"""glmtts-say, the command a person runs, against a running emulator."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from glmtts.emulator.prompts import DEFAULT_PROMPTS
from glmtts.wav import read_wav
from tests.support import ROOT, Service, emulator, free_port

# One worker runs the whole module, so its module-scoped fixture starts once.
pytestmark = pytest.mark.xdist_group("test_say")


@pytest.fixture(scope="module")
def server() -> Iterator[Service]:
    with emulator() as service:
        yield service


def say(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "glmtts.say", *args], cwd=ROOT, capture_output=True,
                          input=stdin.encode() if stdin is not None else None, timeout=60)


def test_writes_a_playable_wav(server: Service, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    done = say("你好，欢迎使用语音合成。", "-o", str(out), "--url", server.url)
    assert done.returncode == 0, done.stderr
    audio = read_wav(out.read_bytes())
    assert (audio.channels, audio.sample_width, audio.sample_rate) == (1, 2, 24000)
    assert 2.0 < audio.duration < 4.0
    assert f"wrote {out}: {audio.duration:.2f} s of audio at 24000 Hz".encode() in done.stderr


def test_upload_mode_from_stdin_at_32k(server: Service, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    done = say("-", "-o", str(out), "--url", server.url, "--prompt-audio",
               DEFAULT_PROMPTS["exampleA"].prompt_audio_path, "--prompt-text", "参考", "--sample-rate", "32000",
               "-q", stdin="Hello from standard input.")
    assert done.returncode == 0 and done.stderr == b""
    assert read_wav(out.read_bytes()).sample_rate == 32000


def test_server_errors_exit_1_with_the_detail(server: Service, tmp_path: Path) -> None:
    done = say("你好", "-o", str(tmp_path / "x.wav"), "--url", server.url, "--index", "nope")
    assert done.returncode == 1
    assert b"server answered 404: Prompt index 'nope' not found" in done.stderr
    assert not (tmp_path / "x.wav").exists()


def test_unreachable_server_exits_3(tmp_path: Path) -> None:
    done = say("你好", "-o", str(tmp_path / "x.wav"), "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 3 and b"cannot reach" in done.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert say("你好").returncode == 2  # no -o
    done = say("你好", "-o", str(tmp_path / "x.wav"), "--prompt-audio", "/nonexistent.wav", "--prompt-text", "x")
    assert done.returncode == 2 and b"no such file" in done.stderr
