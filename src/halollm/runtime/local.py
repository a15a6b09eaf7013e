"""Local worker processes for `halo run --local N` (and tests): start, wait, clean up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

from halollm.errors import HaloError
from halollm.runtime.keys import ENV

READY = re.compile(r"halo worker listening on (\S+):(\d+)")


class LocalWorkers:
    """N `halo worker` processes on 127.0.0.1, each on a free port. A context manager: they
    are stopped on exit, Ctrl-C and errors included."""

    def __init__(self, n: int, key: str, model: str | None = None, threads: int = 1,
                 extra_args: Sequence[str] = (), startup_timeout: float = 120.0,
                 quiet: bool = True, drop_rates: Sequence[float] = ()) -> None:
        if n < 1:
            raise HaloError(f"--local needs at least 1 worker (got {n})")
        self.procs: list[subprocess.Popen[str]] = []
        self.addresses: list[tuple[str, int]] = []
        env = {**os.environ, ENV: key}
        cmd = [sys.executable, "-m", "halollm.cli.main", "worker", "--listen", "127.0.0.1:0",
               "--threads", str(threads), *extra_args]
        if model:
            cmd += ["--model", model]
        stderr: int | IO[str] | None = subprocess.DEVNULL if quiet else None
        try:
            for i in range(n):
                rate = drop_rates[i] if i < len(drop_rates) else 0.0
                extra = ["--drop-rate", str(rate)] if rate else []
                self.procs.append(subprocess.Popen(cmd + extra, env=env, stdout=subprocess.PIPE,
                                                   stderr=stderr, text=True))
            for proc in self.procs:
                self.addresses.append(self._wait_ready(proc, startup_timeout))
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[str], timeout: float) -> tuple[str, int]:
        end = time.monotonic() + timeout
        assert proc.stdout is not None
        while time.monotonic() < end:
            line = proc.stdout.readline()
            if not line:
                code = proc.wait(timeout=5)
                raise HaloError(f"a local worker exited during startup (exit code {code})")
            m = READY.search(line)
            if m:
                return m.group(1), int(m.group(2))
        raise HaloError("a local worker did not start in time")

    def kill(self, index: int) -> None:
        """Kill one worker outright (fault-injection in tests and benchmarks)."""
        self.procs[index].kill()
        self.procs[index].wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
