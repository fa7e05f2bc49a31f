"""A real `lanner serve` process for the HTTP tests.

It runs with no model options, so it takes the README's path: build (or reuse) the offline demo models in
its cache dir and serve `demo-llama` and `demo-falcon`. One process serves the whole session; the tests
talk to it with the official `openai` client and raw httpx.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-123"


@dataclass
class Server:
    base_url: str
    cache_dir: Path
    proc: subprocess.Popen
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start `python -m app serve ...` and wait until /ready answers 200 (or the process dies)."""
    port = free_port()
    cmd = [sys.executable, "-m", "app", "serve", "--port", str(port), *args]
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if c.get(f"{base}/ready").status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling a readiness endpoint, not synchronising on time
    stop_server(proc)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    cache = root / "cache"
    proc, base = start_server(["--cache-dir", str(cache), "--api-key", API_KEY], root / "server.log")
    yield Server(base, cache, proc, root / "server.log")
    code = stop_server(proc)
    assert code == 0, f"server exited with {code}"


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture(scope="session")
def client(server: Server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def aclient(server: Server):
    import openai

    return openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60)
