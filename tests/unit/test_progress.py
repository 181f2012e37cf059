"""The per-step progress line: one line per step off a terminal (logs, tests, ray job submit),
a bar rewritten in place on a terminal (checked through a real pty)."""
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

from eapo_ray.progress import duration, progress_line

ROOT = Path(__file__).resolve().parents[2]
ROW = {"reward": 0.4375, "consult_rate": 0.125, "acceptance_prob": 0.5, "samples_per_s": 20.06}


def test_line_per_step_off_a_terminal():
    line = progress_line(3, 6, ROW, 0.1666, 2, 7.4)
    assert line == ("[eapo] step 3/6 reward 0.438 consult_rate 0.12 accept_p 0.50 heldout_acc 0.167 samples/s 20.1 "
                    "staleness 2 eta 0m07s\n")
    assert "nan" in progress_line(1, 6, {}, 0.0, 0, 0)  # fields not known yet
    assert (duration(7.9), duration(750), duration(7500), duration(-3)) == ("0m07s", "12m30s", "2h05m", "0m00s")


def test_bar_in_place_on_a_terminal():
    mid, last = progress_line(3, 6, ROW, 0.5, 0, 60, tty=True), progress_line(6, 6, ROW, 0.5, 0, 0, tty=True)
    assert mid.startswith("\r\x1b[K[eapo] [##########----------] step 3/6 ") and "\n" not in mid
    assert mid.endswith("eta 1m00s")
    assert last.startswith("\r\x1b[K[eapo] [####################] step 6/6 ") and last.endswith("eta 0m00s\n")


def test_through_a_pty_the_line_is_rewritten_and_through_a_pipe_it_is_not():
    code = ("import sys\nfrom eapo_ray.progress import show_progress\n"
            "for s in (1, 2, 3):\n    show_progress(s, 3, {}, 0.5, 0, 3 - s)\n"
            "    if s == 2:\n        print('[eapo] a message', file=sys.stderr)\n        print('[eapo] another')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    main, sub = pty.openpty()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=sub, stderr=sub, env=env, close_fds=True)
    os.close(sub)
    out, deadline = b"", time.time() + 60
    while time.time() < deadline:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=30)
    os.close(main)
    text = out.decode()
    assert text.count("\r\x1b[K[eapo] [") == 3, repr(text)  # one line, rewritten...
    # ...except that a message printed between steps starts a line of its own, and the bar comes back after it
    assert re.search(r"step 2/3 [^\n]*\r?\n\[eapo\] a message\r?\n\[eapo\] another\r?\n\r\x1b\[K\[eapo\] \[#+\] step 3/3",
                     text), repr(text)
    assert text.count("\n") == 4, repr(text)
    piped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60).stdout
    assert re.findall(r"^\[eapo\] step (\d)/3 .* eta \dm\d\ds$", piped, re.M) == ["1", "2", "3"] and "\r" not in piped
    assert "[eapo] another\n[eapo] step 3/3" in piped
