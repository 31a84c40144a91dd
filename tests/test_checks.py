"""kvaccel.checks: the one home of the int / number / ratio argument checks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvaccel.checks import check_int, check_number, check_ratio

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", [True, 1.0, "3", None, -1, 9])
def test_check_int_refuses_what_is_not_an_int_in_range(value):
    with pytest.raises(ValueError, match=rf"n \({value!r}\) must be an int in \[0, 8\] \(tokens\)"):
        check_int("n", value, 0, 8, why="tokens")


def test_check_int_takes_the_bounds():
    check_int("n", 0, 0, 8)
    check_int("n", 8, 0, 8)
    check_int("n", 10**9, 1)
    with pytest.raises(ValueError, match=r"n \(0\) must be an int >= 1$"):
        check_int("n", 0, 1)


@pytest.mark.parametrize(("kw", "good", "bad", "rule"), [
    ({"low": 0, "high": 1}, [0, 0.5, 1], [-0.1, 1.1], r"in \[0, 1\]"),
    ({"low": 0, "high": 1, "low_open": True}, [1e-9, 1], [0, 1.5], r"in \(0, 1\]"),
    ({"low": 0, "high": 1, "high_open": True}, [0, 0.999], [1], r"in \[0, 1\)"),
    ({"low": 1}, [1, 7.5], [0.99], r">= 1"),
    ({"low": 0, "low_open": True}, [1e-9], [0], r"> 0"),
])
def test_check_number_intervals(kw, good, bad, rule):
    for value in good:
        check_number("x", value, **kw)
    for value in [*bad, True, float("nan"), "0.5", None]:
        with pytest.raises(ValueError, match=rf"x \(.*\) must be a number {rule}"):
            check_number("x", value, **kw)


def test_check_ratio_is_the_closed_unit_interval():
    check_ratio("r", 0)
    check_ratio("r", 1.0)
    with pytest.raises(ValueError, match=r"r \(1.5\) must be a number in \[0, 1\]"):
        check_ratio("r", 1.5)


def test_no_hand_written_int_checks_outside_the_checks_module():
    """The pattern `isinstance(x, bool) or not isinstance(x, int)` lives in kvaccel/checks.py only."""
    found = subprocess.run(
        ["git", "grep", "-nE", r"isinstance\(.*, bool\) or not isinstance\(", "--", "kvaccel", "kernels", "patches",
         "evals", ":!kvaccel/checks.py"], cwd=ROOT, capture_output=True, text=True).stdout
    assert found == "", f"hand-written checks; use kvaccel.checks:\n{found}"
