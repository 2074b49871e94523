"""Peak memory of one method's run: the accelerator's allocator peak where there is one, else the process's
resident set, sampled by a background thread (the OS's own peak, ru_maxrss, never goes down between methods)."""
from __future__ import annotations

import os
import resource
import threading

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the process peak so far (kilobytes on Linux/BSD)
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes`` and ``pm.kind`` ('cuda' or 'rss')."""

    def __init__(self, device: torch.device, interval_s: float = 0.05):
        self.device, self.interval_s = torch.device(device), interval_s
        self.kind = "cuda" if self.device.type == "cuda" else "rss"
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __enter__(self):
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kind == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
        return False
