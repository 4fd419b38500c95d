"""`RemoteServer`: a real `python -m jinfer.server` in a subprocess on loopback, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_TEST_MEMORY_FRACTION = "0.15"


class RemoteServer:
    """Starts the server with `args`, waits until /health answers, and stops it with SIGTERM.

    Use as a context manager; `url(path)`, `client()` (the official openai client) and
    `stop()` (returns the exit code and seconds it took)."""

    def __init__(self, args: list[str], api_key: Optional[str] = None, timeout: float = 300):
        self.port = free_port()
        self.api_key = api_key
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("JINFER_API_KEY", None)
        if not any(env.get(name) for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                              "XLA_CLIENT_MEM_FRACTION")):
            # on a GPU the test process may hold JAX's 75% already: the server takes a share
            # beside it (not the 95% it claims when it owns the GPU); the tests' models are tiny
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = SERVER_TEST_MEMORY_FRACTION
        cmd = [sys.executable, "-m", "jinfer.server", *args, "--port", str(self.port)]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log_path = f"/tmp/jinfer-server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                if httpx.get(self.url("/health"), timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server was not ready in {timeout} s:\n{self.log()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none",
                             max_retries=0, **kwargs)

    def async_client(self, **kwargs):
        import openai
        return openai.AsyncOpenAI(base_url=self.url("/v1"), api_key=self.api_key or "none",
                                  max_retries=0, **kwargs)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self, timeout: float = 20) -> tuple[Optional[int], float]:
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                return None, time.monotonic() - started
        self._log.close()
        return self.proc.returncode, time.monotonic() - started

    def __enter__(self) -> "RemoteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
