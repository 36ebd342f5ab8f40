"""A one-line progress bar on stderr (torch is our only dependency, so no tqdm)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``update()`` once per step; redraws at most 10 times a second, or every 10% off a TTY."""

    def __init__(
        self, total: int, label: str, *, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total = max(1, total)
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.last_decile = -1
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, note: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = 10 * self.done // self.total
        if self.tty and (now - self.last_draw >= 0.1 or self.done == self.total):
            self.last_draw = now
            self.stream.write("\r" + self._line(now, note))
            self.stream.flush()
        elif not self.tty and decile != self.last_decile:
            self.last_decile = decile
            self.stream.write(self._line(now, note) + "\n")
            self.stream.flush()

    def _line(self, now: float, note: str) -> str:
        filled = int(30 * self.done / self.total)
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        bar = "#" * filled + "-" * (30 - filled)
        return (
            f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {rate:5.1f} it/s {note}"
        )

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
