"""A progress line for the passes of a corpus preparation: documents, tokens, MB of text, MB/s and, when
the size is known, the share done and the time left. On a terminal it is redrawn in place on stderr;
otherwise (a log file, a multirun) a line is logged every LOG_EVERY_S seconds. Each pass ends with one
logged line of its totals."""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional, TextIO

log = logging.getLogger("qknorm.data")

DRAW_EVERY_S = 0.5
LOG_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, what: str, total_chars: Optional[int] = None, total_bytes: Optional[int] = None,
                 stream: Optional[TextIO] = None):
        self.what, self.total_chars, self.total_bytes = what, total_chars, total_bytes
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.docs = self.tokens = self.chars = self.nbytes = 0
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._drawn = False

    def update(self, docs: int = 0, tokens: int = 0, chars: int = 0, nbytes: int = 0) -> None:
        self.docs += docs
        self.tokens += tokens
        self.chars += chars
        self.nbytes += nbytes
        now = time.perf_counter()
        if now - self._last >= (DRAW_EVERY_S if self.tty else LOG_EVERY_S):
            self._last = now
            self._show(self.line(now))

    def _fraction(self) -> Optional[float]:
        if self.total_chars:
            return min(1.0, self.chars / self.total_chars)
        if self.total_bytes:
            return min(1.0, self.nbytes / self.total_bytes)
        return None

    def line(self, now: Optional[float] = None, final: bool = False) -> str:
        elapsed = max(1e-9, (time.perf_counter() if now is None else now) - self.t0)
        parts = [f"{self.docs:,} document{'s' if self.docs != 1 else ''}"] if self.docs else []
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens")
        parts.append(f"{self.nbytes / 1e6:,.1f} MB, {self.nbytes / 1e6 / elapsed:.2f} MB/s")
        fraction = self._fraction()
        if fraction is not None and not final:
            left = elapsed * (1 - fraction) / fraction if fraction > 0 else None
            parts.append(f"{100 * fraction:.0f}%" + (f", {_duration(left)} left" if left is not None else ""))
        return f"{self.what}: " + ", ".join(parts)

    def _show(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(min(160, len(line) + 8)))
            self.stream.flush()
            self._drawn = True
        else:
            log.info("%s", line)

    def close(self) -> float:
        """End the line; log the totals. Returns the pass's wall time in seconds."""
        elapsed = time.perf_counter() - self.t0
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        log.info("%s in %s", self.line(final=True).replace(f"{self.what}: ", f"{self.what}: done, ", 1), _duration(elapsed))
        return elapsed
