"""`flowkern bench`: cases (what is timed), timer (the one timer for CPU and GPU), report (Markdown, JSON, JSON
lines) and cli (the command: its flags, the run under a time budget, the warm-up workers). See flowkern.bench.cli."""
from .cases import Case, Compiler, plan, variants_for
from .cli import main
from .report import JsonLines
from .timer import Timer

__all__ = ["Case", "Compiler", "JsonLines", "Timer", "main", "plan", "variants_for"]
