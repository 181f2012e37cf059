"""The per-step progress line (pure formatting; no Ray). On a terminal it is a bar rewritten in
place (`\\r`, one line); anywhere else (log files, tests, `ray job submit`) one line per step."""
from __future__ import annotations

import sys

BAR_WIDTH = 20


def duration(seconds: float) -> str:
    """0m07s, 12m30s, 2h05m."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(step: int, total: int, row: dict, heldout_acc: float, staleness: int, eta_s: float,
                  tty: bool = False) -> str:
    """The text to write for step `step` of `total`. `row`: the step's metrics (reward,
    consult_rate, acceptance_prob, samples_per_s; missing ones print nan). Not a terminal: one
    newline-terminated line. A terminal: carriage return, erase the line, a bar, the same fields;
    a newline only after the last step (`show_progress` starts the next message on a line of its own)."""
    nan = float("nan")
    text = (f"step {step}/{total} reward {row.get('reward', nan):.3f} consult_rate {row.get('consult_rate', nan):.2f} "
            f"accept_p {row.get('acceptance_prob', nan):.2f} heldout_acc {heldout_acc:.3f} "
            f"samples/s {row.get('samples_per_s', nan):.1f} staleness {staleness} eta {duration(eta_s)}")
    if not tty:
        return f"[eapo] {text}\n"
    filled = min(BAR_WIDTH, round(BAR_WIDTH * step / max(total, 1)))
    return f"\r\x1b[K[eapo] [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {text}" + ("\n" if step >= total else "")


class _AfterBar:
    """Stands in for sys.stdout / sys.stderr while a bar is open on the terminal: the first other
    message (a warning, a restart notice) ends the bar's line first, then both streams are restored."""

    def __init__(self, stream, bar_stream, saved: tuple):
        self._stream, self._bar_stream, self._saved = stream, bar_stream, saved

    def write(self, text: str):
        if (sys.stdout, sys.stderr) != self._saved:
            sys.stdout, sys.stderr = self._saved
            if text and not text.startswith("\r"):
                self._bar_stream.write("\n")
                self._bar_stream.flush()
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _restore() -> None:
    if isinstance(sys.stdout, _AfterBar) or isinstance(sys.stderr, _AfterBar):
        out, err = sys.stdout, sys.stderr
        sys.stdout = out._stream if isinstance(out, _AfterBar) else out
        sys.stderr = err._stream if isinstance(err, _AfterBar) else err


def show_progress(step: int, total: int, row: dict, heldout_acc: float, staleness: int, eta_s: float,
                  stream=None) -> None:
    """Write the progress line to `stream` (stdout), in place when it is a terminal."""
    _restore()
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    tty = bool(isatty and isatty())
    stream.write(progress_line(step, total, row, heldout_acc, staleness, eta_s, tty=tty))
    stream.flush()
    if tty and step < total:  # the bar's line is open: the next other message starts a new line
        saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _AfterBar(saved[0], stream, saved), _AfterBar(saved[1], stream, saved)
