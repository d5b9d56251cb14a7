"""Plain progress lines (stderr not a terminal): a quick step prints nothing; each update that
lasts long enough gets its own line, so a counter such as bench's "run 2/5" never seems to jump
from run 1 to run 5."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from idle_export.cli import options


@pytest.fixture
def fast(monkeypatch):
    """The thresholds scaled down (a step: 0.2 s, an update: 0.1 s), the rules the same."""
    monkeypatch.setattr(options._LineStatus, "AFTER_S", 0.2)
    monkeypatch.setattr(options._LineStatus, "UPDATE_AFTER_S", 0.1)
    monkeypatch.setattr(options._LineStatus, "EVERY_S", 5.0)
    out = io.StringIO()
    return out, Console(file=out, force_terminal=False, width=200)


def test_quick_step_prints_nothing(fast):
    out, console = fast
    with options._LineStatus(console, "loading") as st:
        st.update("batch 1: run 1/5")
    time.sleep(0.4)  # a timer that fired late would print now
    assert out.getvalue() == ""


def test_every_run_that_lasts_gets_its_line(fast):
    out, console = fast
    with options._LineStatus(console, "batch 1") as st:
        for r in range(5):
            st.update(f"batch 1: run {r + 1}/5")
            time.sleep(0.35)
        st.update("batch 1: done")  # ends at once: no line
    time.sleep(0.3)
    assert out.getvalue().splitlines() == [f"· batch 1: run {r}/5" for r in range(1, 6)]


def test_quick_updates_are_rate_limited_but_never_silent(fast):
    out, console = fast
    with options._LineStatus(console, "calibrating") as st:
        for i in range(40):  # 1.2 s of 0.03-s updates: the step's line (a loaded machine: a few more)
            st.update(f"batch {i + 1}/40")
            time.sleep(0.03)
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= 5 and all(ln.startswith("· batch ") for ln in lines), lines
