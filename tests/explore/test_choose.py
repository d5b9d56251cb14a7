"""Ratio lists, picking a ratio for a budget, and the Pareto front (pure functions on rows)."""

from __future__ import annotations

import pytest

from idle_export.errors import BadInputError
from idle_export.explore.choose import choose_ratio, parse_ratios
from idle_export.explore.pareto import pareto_front


def row(r, agreement, ips, ms):
    return {"keep_rate": r, "agreement": agreement, "accuracy": None,
            "images_per_s": {"1": ips}, "latency_ms": {"1": ms}}


ROWS = [row(0.5, 0.90, 100.0, 10.0), row(0.6, 0.97, 80.0, 12.5), row(0.7, 0.97, 70.0, 14.0),
        row(0.8, 0.99, 60.0, 16.0), row(0.9, 1.00, 50.0, 20.0)]


@pytest.mark.parametrize("text,want", [
    ("0.5:0.9:0.1", [0.5, 0.6, 0.7, 0.8, 0.9]),
    ("0.5:1:0.25", [0.5, 0.75, 1.0]),
    ("0.7,0.5, 0.6,0.7", [0.5, 0.6, 0.7]),
    ("1", [1.0]),
])
def test_parse_ratios(text, want):
    assert parse_ratios(text) == want


@pytest.mark.parametrize("text,message", [
    ("0:0.5:0.1", "keep ratio 0 is outside"), ("0.5,1.01", "keep ratio 1.01 is outside"),
    ("0.9:0.5:0.1", "stop ≥ start"), ("0.5:0.9", "not start:stop:step"), ("nan", "keep ratio nan"),
    ("", "names no ratio"),
])
def test_parse_ratios_errors(text, message):
    with pytest.raises(BadInputError, match=message):
        parse_ratios(text)


def test_latency_budget_best_agreement_then_the_higher_ratio():
    c = choose_ratio(ROWS, [1], latency_ms=15.0)
    assert c.met and c.row["keep_rate"] == 0.7  # 0.6 and 0.7 agree equally: the nearer to dense
    assert "≤ 15 ms per call at batch 1" in c.reason and "3 of 5 qualify" in c.reason


def test_min_agreement_fastest():
    c = choose_ratio(ROWS, [1], min_agreement=0.97)
    assert c.met and c.row["keep_rate"] == 0.6
    both = choose_ratio(ROWS, [1], latency_ms=17.0, min_agreement=0.98)
    assert both.met and both.row["keep_rate"] == 0.8


def test_nothing_meets_names_the_closest():
    c = choose_ratio(ROWS, [1], latency_ms=9.0)
    assert not c.met and c.row["keep_rate"] == 0.5
    assert c.reason.startswith("no keep ratio meets ≤ 9 ms per call at batch 1; the closest is 0.5 (")
    assert "10.00 ms per call" in c.reason
    c = choose_ratio(ROWS, [1], min_agreement=1.0 + 0.0)
    assert c.met and c.row["keep_rate"] == 0.9
    c = choose_ratio(ROWS[:4], [1], min_agreement=1.0)
    assert not c.met and c.row["keep_rate"] == 0.8 and "agreement 99.0%" in c.reason


def test_choice_option_errors():
    with pytest.raises(BadInputError, match="needs one batch size"):
        choose_ratio(ROWS, [1, 64], latency_ms=5.0)
    with pytest.raises(BadInputError, match="must be > 0"):
        choose_ratio(ROWS, [1], latency_ms=0.0)
    with pytest.raises(BadInputError, match="nothing to choose by"):
        choose_ratio(ROWS, [1])


def test_pareto_front():
    assert pareto_front(ROWS, 1) == [0.5, 0.6, 0.8, 0.9]  # 0.7: 0.6 is faster with equal agreement
