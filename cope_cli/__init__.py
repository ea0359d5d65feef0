"""The `cope` command line (Typer app in :mod:`cope_cli.app`)."""

import os

# OpenMP threads that spin while waiting made training steps ~10x slower (2.7 s vs 0.2 s per
# counting step, measured) when other processes share the CPUs; passive waiting costs little
# on an idle machine. It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
