"""A real MongoDB wire server for the tests: SecantusDB in a child process on a loopback port.

It runs in its own process (not a thread of the test process) so that it can be killed
and restarted on the same data directory and port, and so the server does not compete
with the tests for one interpreter lock. ``DYNAPROMPT_TEST_MONGODB_URI`` replaces it with
a server you run yourself (then the tests that stop the server are skipped).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MongoServer", "fresh_database_url"]

_LISTENING = re.compile(r"listening on [^:\s]+:(\d+)")


class MongoServer:
    """One SecantusDB process: ``start()``, ``kill()``/``stop()``, ``start()`` again on the same port."""

    def __init__(self, data_dir: Path, *, external_uri: str | None = None) -> None:
        self.data_dir = data_dir
        self.external_uri = external_uri
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """``mongodb://127.0.0.1:port`` (no database, no trailing slash)."""
        if self.external_uri is not None:
            return self.external_uri.rstrip("/")
        return f"mongodb://127.0.0.1:{self.port}"

    @property
    def can_restart(self) -> bool:
        return self.external_uri is None

    def start(self, timeout: float = 30.0) -> None:
        if self.external_uri is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        log_path.write_bytes(b"")
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(self.port),
                 "--storage-path", str(self.data_dir), "--log-level", "INFO"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _LISTENING.search(log_path.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return
            if self._process.poll() is not None:
                raise RuntimeError(f"SecantusDB exited at start: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"SecantusDB did not start within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-whatever, as on a crash."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: the server shuts down cleanly."""
        self._end(signal.SIGTERM)

    def _end(self, signum: int) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fresh_database_url(server_uri: str) -> str:
    """``server_uri`` (with or without a database and options) naming a database no other test uses."""
    parts = urlsplit(server_uri)
    return urlunsplit((parts.scheme, parts.netloc, f"/dp_{uuid.uuid4().hex[:12]}", parts.query, ""))


def external_uri() -> str | None:
    return os.environ.get("DYNAPROMPT_TEST_MONGODB_URI") or None
