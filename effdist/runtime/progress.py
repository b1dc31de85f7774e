"""Progress of a long task on the console (stderr): a bar on a terminal, plain lines in a pipe or log.

Tokenizer training, preprocessing, `effdist convert` and checkpoint loading report through `Progress`.
On a terminal the bar is redrawn in place with ``\\r`` (at most every `redraw_s`); in a pipe or a log
file (Slurm output, CI) nothing is drawn: a task that runs longer than `line_every_s` writes one plain
line per `line_every_s` with its count, so short tasks stay silent and long ones leave a readable trail.

``EFFDIST_PROGRESS`` overrides the choice: ``bar`` (draw even into a pipe, e.g. a terminal multiplexer
that hides its tty), ``lines`` (never draw), ``off`` (no task progress at all). The training run's own
console line (effdist.train.metrics.ProgressBar) follows ``bar`` and ``lines`` too.

`console_line` writes a line above whichever bar is on the terminal, so log lines never glue onto one.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, Optional, Protocol, TextIO, TypeVar

ENV = "EFFDIST_PROGRESS"
MODES = ("bar", "lines", "off")

T = TypeVar("T")


def mode(stream: TextIO | None = None) -> str:
    """How progress goes to `stream` (default stderr): "bar" on a terminal, else "lines"; EFFDIST_PROGRESS wins."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in MODES:
        return forced
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        return "bar" if isatty and isatty() else "lines"
    except ValueError:  # a closed stream
        return "lines"


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether bars are drawn on `stream` (a terminal, or EFFDIST_PROGRESS=bar)."""
    return mode(stream) == "bar"


class _Bar(Protocol):
    stream: TextIO

    def write_above(self, text: str) -> None: ...

    def close(self) -> None: ...


# The bar on the terminal now, if any: console_line writes above it.
_active: Optional[_Bar] = None


def set_active(bar: Optional[_Bar]) -> None:
    global _active
    _active = bar


def active() -> Optional[_Bar]:
    return _active


def end_bar() -> None:
    """End the line of the bar on the terminal, if any (before a last error line, which would otherwise be glued
    to the bar's text)."""
    bar = _active
    if bar is not None:
        try:
            bar.close()
        except (OSError, ValueError):  # the console is gone
            pass
        set_active(None)


def write_above(stream: TextIO, shown: str, text: str) -> None:
    """Print `text` as a line of its own on `stream`; the bar `shown` there (if any) is drawn again below it."""
    stream.write(("\r\x1b[K" + text + "\n" + shown) if shown else text + "\n")
    stream.flush()


def console_line(text: str, stream: TextIO | None = None) -> None:
    """Write one line to the console (stderr), above the progress bar when one is shown there."""
    stream = stream if stream is not None else sys.stderr
    if _active is not None and _active.stream is stream:
        _active.write_above(text)
    else:
        stream.write(text + "\n")
        stream.flush()


def _fmt_count(n: float, unit: str) -> str:
    if unit == "B":
        for name in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or name == "TiB":
                return f"{n:.0f} {name}" if name == "B" else f"{n:.1f} {name}"
            n /= 1024
    return f"{n:,.0f}{' ' + unit if unit else ''}"


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """A counted task: ``with Progress("converting", total=n, unit="layers") as p: ... p.update()``.

    `total` may be None (a count without a percentage). `stage(text)` names what runs now (a step that
    reports no count, e.g. "reading tensors"). `enabled=False` (e.g. on ranks other than 0) makes
    every method a no-op.
    """

    def __init__(self, desc: str, total: float | None = None, unit: str = "", *, stream: TextIO | None = None,
                 enabled: bool = True, redraw_s: float = 0.1, line_every_s: float = 30.0, clock=time.monotonic):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode = mode(self.stream) if enabled else "off"
        self.redraw_s, self.line_every_s, self.clock = redraw_s, line_every_s, clock
        self.done = 0.0
        self.stage_text = ""
        self.start = clock()
        self._last_draw = float("-inf")
        self._last_line = self.start
        self._shown = ""
        self.closed = False

    # ---------------------------------------------------------------- reporting
    def update(self, n: float = 1) -> None:
        self.done += n
        self._report()

    def stage(self, text: str) -> None:
        self.stage_text = text
        self._report(force=True)

    def iterate(self, items: Iterable[T], weight=lambda item: 1) -> Iterator[T]:
        """Yield `items`, counting `weight(item)` after each."""
        for item in items:
            yield item
            self.update(weight(item))

    def line(self) -> str:
        """What the bar or a log line says now."""
        parts = [self.desc + ":"]
        if self.total:
            fraction = min(1.0, self.done / self.total)
            if self.mode == "bar":
                width = 20
                filled = int(width * fraction)
                parts.append(f"[{'#' * filled}{'.' * (width - filled)}]")
            parts.append(f"{100 * fraction:{3 if self.mode == 'bar' else 0}.0f}%")  # a bar keeps its width
            if self.unit == "B":
                parts.append(f"{_fmt_count(self.done, 'B')}/{_fmt_count(self.total, 'B')}")
            else:
                parts.append(f"{_fmt_count(self.done, '')}/{_fmt_count(self.total, self.unit)}")
        elif self.done:
            parts.append(_fmt_count(self.done, self.unit))
        if self.stage_text:
            parts.append(self.stage_text)
        parts.append(_fmt_time(self.clock() - self.start))
        return " ".join(parts)

    def _report(self, force: bool = False) -> None:
        if self.closed or self.mode == "off":
            return
        now = self.clock()
        if self.mode == "bar":
            if force or now - self._last_draw >= self.redraw_s:
                self._draw()
                self._last_draw = now
        elif now - self._last_line >= self.line_every_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_line = now

    def _draw(self) -> None:
        self._shown = self.line()
        self.stream.write("\r\x1b[K" + self._shown)
        self.stream.flush()
        set_active(self)

    def write_above(self, text: str) -> None:
        write_above(self.stream, self._shown, text)

    def close(self) -> None:
        """Finish: the bar is drawn once more in its final state and the line ended; in a pipe, a task
        that already wrote lines writes its final count too."""
        if self.closed:
            return
        self.closed = True
        if self.mode == "bar" and self._shown:
            self.stream.write("\r\x1b[K" + self.line() + "\n")
            self.stream.flush()
        elif self.mode == "lines" and self._last_line != self.start:
            self.stream.write(self.line() + " (done)\n")
            self.stream.flush()
        self._shown = ""
        if _active is self:
            set_active(None)

    def __enter__(self) -> "Progress":
        self._report(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
