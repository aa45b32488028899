"""Start and stop a ``vllm serve`` process (demo, tests, benchmarks).

A context manager around the real CLI, so what it exercises is exactly what a
user runs. Output goes to a log file that is kept for inspection.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "vllm")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class VllmServer:
    """``vllm serve ARGS`` on a free loopback port; waits for /health."""

    def __init__(self, args: list[str], timeout_s: float = 300, env: dict | None = None):
        self.port = free_port()
        self.log_path = os.path.join(tempfile.gettempdir(), f"fiddler-serve-{self.port}.log")
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen(
            vllm_cli() + ["serve", *args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout_s}s:\n{self.output()[-4000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self, prefix: str = "vllm:fiddler_") -> dict[str, float]:
        """Scrapes /metrics: {'name{labels}': value} of the samples starting with `prefix`."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "VllmServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
