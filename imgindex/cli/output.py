"""What the command prints: text safe for a terminal, JSON for scripts, progress lines."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

import click

# Characters a file name may hold that a terminal acts on: C0 and C1 controls (escape sequences,
# newlines, carriage returns, backspace) and the marks that reorder text (bidirectional
# overrides and isolates, which can make a name read as another).
# Also lone surrogates: the bytes of a name that is not UTF-8, as Python reads a command
# line; printed, they would be those raw bytes again (0x9b is a terminal's CSI).
_REORDERING = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"

_TERMINAL_CONTROLS = re.compile(f"[\x00-\x1f\x7f-\x9f{_REORDERING}\ud800-\udfff]")

_NOT_ESCAPED_BY_JSON = re.compile(f"[\x7f-\x9f{_REORDERING}\ud800-\udfff]")  # C0 it does


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a name: shown as path_text does
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str) -> str:
    """``text`` as it may be printed for a person: control characters in it are written as
    ``\\xNN`` / ``\\uNNNN``, so that a file name can neither drive the terminal (clear the
    screen, retitle the window) nor forge lines of a report. Every file name, reason and
    message from the library is printed through this; JSON is exact instead (:func:`print_json`)."""
    return _TERMINAL_CONTROLS.sub(_escape, text)


def display_path(path: str) -> str:
    """A path relative to the current folder when it lies inside it, else absolute; shown
    safely (:func:`shown`)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return shown(path)
    return shown(path if rel.startswith("..") else rel)


def print_json(data: Any) -> None:
    """JSON on stdout. Strings keep every character; those a terminal acts on are written as
    JSON escapes (JSON escapes C0 controls itself; C1 controls and text-reordering marks too,
    here), which decode to the same text."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    click.echo(_NOT_ESCAPED_BY_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


class StageTimer:
    """With --verbose, one line on stderr per finished stage: its name and seconds."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        if self.enabled:
            click.echo(f"{stage}: {now - self._last:.3f} s", err=True)
        self._last = now


def model_stage(vectorizer: Any) -> str:
    """The --verbose name of loading ``vectorizer``: its runtime and precision, and where the
    time went (importing torch, exporting, loading)."""
    parts = [f"{name} {seconds:.3f} s" for name, seconds in vectorizer.timings.items()]
    detail = f"; {', '.join(parts)}" if parts else ""
    return f"load model ({vectorizer.runtime} runtime, {vectorizer.precision}{detail})"


class StatusLine:
    """A status line on stderr: rewritten in place on a terminal, at most every ``interval``
    seconds; elsewhere (a log file, a job scheduler) printed as a plain line every ``log_every``
    seconds, or not at all without it."""

    def __init__(self, enabled: bool, interval: float, log_every: float | None = None):
        self.terminal = sys.stderr.isatty()
        self.enabled = enabled and (self.terminal or log_every is not None)
        self.interval = interval if self.terminal else (log_every or 0.0)
        self._last = 0.0
        self._width = 0

    def due(self, force: bool = False) -> bool:
        """Whether to show a new line now (always with ``force``)."""
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.interval and not force):
            return False
        self._last = now
        return True

    def show(self, text: str) -> None:
        if self.terminal:
            click.echo("\r" + text.ljust(self._width), nl=False, err=True)
            self._width = len(text)
        else:
            click.echo(text, err=True)

    def clear(self) -> None:
        if self.enabled and self._width:
            click.echo("\r" + " " * self._width + "\r", nl=False, err=True)
            self._width = 0


class ProgressLine(StatusLine):
    """Embedding progress with a bar, images/s and the time left, on a terminal only."""

    def __init__(self, enabled: bool):
        super().__init__(enabled, interval=0.2)

    def __call__(self, state: Any) -> None:
        if not self.due(force=state.done >= state.total or state.loading_model):
            return
        if state.loading_model:
            what = "Starting Ray and the network on its actors" if state.engine == "ray" else ""
            self.show(f"{what or 'Loading the model'} ... ({counted(state.total, 'file')} to read)")
            return
        rate = state.images_per_second
        remaining = state.total - state.done
        eta = f"  ETA {duration_text(remaining / rate)}" if rate > 0 and remaining else ""
        width = 24
        filled = int(width * state.done / state.total) if state.total else width
        bar = "#" * filled + "-" * (width - filled)
        speed = f"  {rate:.1f} images/s" if rate > 0 else ""  # none until one is measured
        elapsed = duration_text(state.elapsed)
        actors = f"  {counted(state.actors, 'actor')}" if state.engine == "ray" else ""
        self.show(f"Embedding [{bar}] {state.done}/{state.total}{speed}{actors}  {elapsed}{eta}")


def duration_text(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def counted(n: int, noun: str) -> str:
    """``1 image``, ``2 images``; ``1 entry``, ``2 entries``."""
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{n} {noun if n == 1 else plural}"
