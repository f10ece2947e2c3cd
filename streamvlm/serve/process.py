"""`streamvlm serve` in a child process, for the load bench and the tests: started on a free port of
127.0.0.1 (it prints the URL it took), waited for until /health answers, stopped with SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None, log_path: str | Path | None = None,
                 api_key: str | None = None, media_dir: Path | None = None, timeout: float = 120.0):
        """args: what follows `streamvlm serve` (--port 0 is added); its stderr goes to log_path."""
        self.api_key, self.media_dir = api_key, media_dir
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        argv = [sys.executable, "-m", "streamvlm", "serve", "--port", "0", *args]
        if api_key:
            argv += ["--api-key", api_key]
        if media_dir is not None:
            argv += ["--allowed-media-dir", str(media_dir)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        line = self.proc.stdout.readline()  # the first line names the address once the socket listens
        if "listening on " not in line:
            self.stop()
            raise RuntimeError(f"streamvlm serve did not start: {line!r}\n{self.log()[-2000:]}")
        self.url = line.split("listening on ", 1)[1].split()[0]
        self.pid = self.proc.pid
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"streamvlm serve did not become healthy\n{self.log()[-2000:]}")
            time.sleep(0.1)

    def proc_status(self, field: str) -> int:
        """A number from /proc/PID/status (Linux), e.g. VmRSS (KiB) or Threads."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/{self.pid}/status")

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far, user and system, on every core (Linux: /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        return self.proc_status("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """The most resident memory the server has held since it started or since reset_peak()."""
        return self.proc_status("VmHWM") * 1024

    def reset_peak(self) -> None:
        """Start peak_rss_bytes() over from the present RSS (Linux: writes 5 to /proc/PID/clear_refs)."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
