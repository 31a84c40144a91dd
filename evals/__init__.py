"""kvaccel's evaluation harness (importable as ``kvaccel.evals``): accuracy, fidelity, speed and memory."""

from .bench import run_bench
from .report import write_reports
from .runner import read_results, run_eval

__all__ = ["read_results", "run_bench", "run_eval", "write_reports"]
