"""Peak resident memory of this process and of every Ray process on the machine, sampled
from a background thread. Ray names a worker process by what it runs
(`ray::MapWorker(ReadCorpusFiles->MapBatches(SnippetMiner)).submit`, `ray::RayTrainWorker`),
so each peak is kept with the title the process had when it was reached, and the time."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import psutil

DRIVER = "driver (this process)"


@dataclass
class Peak:
    title: str
    rss: int
    at: float  # time.time() when reached


def process_title(cmdline: list[str]) -> str | None:
    """What a Ray process runs (`ray::RayTrainWorker`, `Ray system (raylet)`...), None for non-Ray processes."""
    line = " ".join(cmdline)
    if line.startswith("ray::"):  # the actor or task, less the method it runs now
        title = line.split()[0]
        head, dot, method = title.rpartition(".")
        return head if dot and method.isidentifier() else title
    for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray_client_server"):
        if name in line and "ray" in line:
            return f"Ray system ({name.removesuffix('.py')})"
    return None


class PeakMemory:
    """`with PeakMemory() as memory: ...`, then `memory.peaks`: pid -> Peak."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.peaks: dict[int, Peak] = {}
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.every_s):
            now = time.time()
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                info = proc.info
                if not info["memory_info"]:
                    continue
                title = DRIVER if info["pid"] == me else process_title(info["cmdline"] or [])
                peak = self.peaks.get(info["pid"])
                if title and (peak is None or info["memory_info"].rss > peak.rss):
                    self.peaks[info["pid"]] = Peak(title, info["memory_info"].rss, now)

    def largest(self, title_part: str) -> int:
        """The largest peak among processes whose title contains `title_part`, in bytes."""
        return max((p.rss for p in self.peaks.values() if title_part in p.title), default=0)

    def by_title(self) -> dict[str, list[Peak]]:
        """Peaks grouped by process title, largest first."""
        groups: dict[str, list[Peak]] = {}
        for peak in sorted(self.peaks.values(), key=lambda p: -p.rss):
            groups.setdefault(peak.title, []).append(peak)
        return groups
