"""Real `hetegen serve` processes on free loopback ports, and a tiny model with a chat template."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

NEVER = 100_000  # an end-of-sequence id the 320-token vocabulary never produces
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `hetegen serve` subprocess. `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, args: list[str], home: Path, timeout: float = 120.0) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = home / f"serve-{self.port}.log"
        env = {**os.environ, "HETEGEN_HOME": str(home), "HF_HUB_OFFLINE": "1", "HETEGEN_NO_PROGRESS": "1"}
        env.pop("HETEGEN_API_KEY", None)
        cmd = [sys.executable, "-m", "hetegen_cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"server did not start in {timeout} s: {self.stderr()}")

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def chat_model(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny LLaMA with a chat template, a 4096-token context (rotary positions need no
    weights) and an end-of-sequence id outside its vocabulary, so every generation runs to
    max_tokens: long generations for the cancellation, queue and shutdown tests."""
    folder = Path(shutil.copytree(tiny_llama_dir, tmp_path_factory.mktemp("serve") / "tiny-chat"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.exists():
            doc = json.loads(path.read_text())
            doc["eos_token_id"] = NEVER
            if name == "config.json":
                doc["max_position_embeddings"] = 4096
            path.write_text(json.dumps(doc))
    return folder


@pytest.fixture(scope="module")
def server_home(tmp_path_factory) -> Path:
    from tests.conftest import SHARED_MODELS

    home = tmp_path_factory.mktemp("serve-home")
    (home / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def server(chat_model, server_home):
    """One server on the tiny chat model for a test module (queue 4, context 1024)."""
    srv = Server(
        ["--model", str(chat_model), "--max-queue", "4", "--context", "1024", "--max-tokens", "16"],
        server_home,
    )
    yield srv
    assert srv.stop() == 0, srv.stderr()
