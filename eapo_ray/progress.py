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
    a newline only after the last step (a message printed between two steps follows the bar on its line)."""
    nan = float("nan")
    text = (f"step {step}/{total} reward {row.get('reward', nan):.3f} consult_rate {row.get('consult_rate', nan):.2f} "
            f"accept_p {row.get('acceptance_prob', nan):.2f} heldout_acc {heldout_acc:.3f} "
            f"samples/s {row.get('samples_per_s', nan):.1f} staleness {staleness} eta {duration(eta_s)}")
    if not tty:
        return f"[eapo] {text}\n"
    filled = min(BAR_WIDTH, round(BAR_WIDTH * step / max(total, 1)))
    return f"\r\x1b[K[eapo] [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {text}" + ("\n" if step >= total else "")


def show_progress(step: int, total: int, row: dict, heldout_acc: float, staleness: int, eta_s: float,
                  stream=None) -> None:
    """Write the progress line to `stream` (stdout), in place when it is a terminal."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    stream.write(progress_line(step, total, row, heldout_acc, staleness, eta_s, tty=bool(isatty and isatty())))
    stream.flush()
