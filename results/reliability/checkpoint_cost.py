"""What the digest costs: saving a checkpoint-like state the old way (torch.save, fsync, rename)
against save_checkpoint (digest, torch.save, fsync, read back and verify, keep the previous),
and loading it (torch.load against load_checkpoint, which recomputes the digest).

Usage: python results/reliability/checkpoint_cost.py OUT_JSON   (ratios within one run)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from recipes.engine.checkpoint import load_checkpoint, save_checkpoint


def plain_save(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def best_of(repeats: int, action) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


torch.set_num_threads(1)
rows = []
folder = Path(tempfile.mkdtemp(prefix="ckpt-cost-"))
for megabytes in (1.5, 48, 192):
    parameters = int(megabytes * 2**20 / 4 / 3)  # weights + two Adam moments, float32
    state = {
        "recipe": "x",
        "model": {"w": torch.randn(parameters)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(parameters),
                                    "exp_avg_sq": torch.rand(parameters)}}},
    }  # fmt: skip
    path = folder / "checkpoint.pt"
    repeats = 5 if megabytes < 100 else 3
    row = {
        "megabytes": megabytes,
        "save_plain_s": best_of(repeats, partial(plain_save, path, state)),
        "load_plain_s": best_of(repeats, partial(torch.load, path, weights_only=True)),
        "save_verified_s": best_of(repeats, partial(save_checkpoint, path, state, True)),
        "load_verified_s": best_of(repeats, partial(load_checkpoint, path)),
    }
    row["save_ratio"] = row["save_verified_s"] / row["save_plain_s"]
    row["load_ratio"] = row["load_verified_s"] / row["load_plain_s"]
    rows.append(row)
    print(json.dumps(row))
for path in folder.iterdir():
    path.unlink()
folder.rmdir()
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
report = {
    "command": "python results/reliability/checkpoint_cost.py " + " ".join(sys.argv[1:]),
    "commit": commit.strip(),
    "machine": f"{platform.node()} ({os.cpu_count()} CPUs, shared), torch {torch.__version__}",
    "note": "best of 3-5 repeats; file on the machine's /tmp; one torch thread",
    "rows": rows,
    "median_save_ratio": statistics.median(row["save_ratio"] for row in rows),
}
Path(sys.argv[1]).write_text(json.dumps(report, indent=2) + "\n")
