"""The training engine every recipe shares.

``config`` (resolution and checking of options), ``rundir`` (run directories and their files),
``checkpoint`` (atomic, weights-only checkpoints with RNG states), ``sampler`` (resumable data
order), ``trainer`` (the loop), ``evaluate`` (loss and accuracy), ``runs`` (reopening runs),
``compare`` (grids of runs: `cope compare`, `cope sweep`), ``report`` (tables, CSV, plots,
markdown), ``heatmaps`` (`cope positions`), ``distributed`` (torchrun / DDP helpers).
"""
