"""Issue 20, as a new user meets it: `cope train counting --pe abs --steps 40` through the real
CLI (a fresh process per command), with a damaged checkpoint and with a full file system.

Usage (as root, for the tmpfs):
    python results/reliability/issue20_faults.py CODE_ROOT OUT_JSON [COMMIT]
CODE_ROOT is put first on PYTHONPATH: this worktree, or an exported copy of the code before
(`git archive 73df8b9 | tar -x -C DIR`, then COMMIT names it).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CODE, RESULT = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
BASE = ["train", "counting", "--pe", "abs", "--steps", "40"]
ENV = {**os.environ, "PYTHONPATH": str(CODE), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def cope(*args: object) -> dict:
    command = [sys.executable, "-m", "cope_cli.app", *map(str, args)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=CODE)
    return {
        "command": "cope " + " ".join(map(str, args)),
        "exit": done.returncode,
        "stderr": done.stderr.strip()[-1500:],
        "stdout_head": done.stdout.strip()[:600],
    }


def run_dir(out: Path) -> Path:
    (run,) = list(out.glob("counting/abs/seed0-*"))
    return run


def max_difference(one: Path, two: Path) -> float:
    a = torch.load(one, weights_only=True)["model"]
    b = torch.load(two, weights_only=True)["model"]
    return max(float((a[key].double() - b[key].double()).abs().max()) for key in a)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp" in p.name)


work = Path(tempfile.mkdtemp(prefix="issue20-"))
report: dict = {"code": str(CODE), "machine": platform.node(), "python": platform.python_version()}
report["commit"] = subprocess.run(
    ["git", "rev-parse", "HEAD"], cwd=CODE, capture_output=True, text=True
).stdout.strip() or " ".join(sys.argv[3:])  # a copy without .git: its commit given by hand
# 1. the uninterrupted run
report["uninterrupted"] = cope(*BASE, "--out", work / "straight")
straight = run_dir(work / "straight") / "checkpoint.pt"

# 2. stopped at step 20, 64 bytes zeroed in the middle of checkpoint.pt, then --resume
report["stopped"] = cope(*BASE, "--stop-after", "20", "--out", work / "damaged")
checkpoint = run_dir(work / "damaged") / "checkpoint.pt"
data = bytearray(checkpoint.read_bytes())
middle = len(data) // 2
data[middle : middle + 64] = bytes(64)
checkpoint.write_bytes(bytes(data))
report["damaged_resume"] = cope(*BASE, "--resume", "--out", work / "damaged")
final = run_dir(work / "damaged") / "checkpoint.pt"
if report["damaged_resume"]["exit"] == 0:
    report["damaged_resume"]["max_abs_difference_to_uninterrupted"] = max_difference(
        final, straight
    )

# 3. a 1.5 MiB tmpfs: the step-0 checkpoint fits, the step-20 one (with Adam state) does not
disk = work / "disk"
disk.mkdir()
if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)]).returncode:
    report["full_disk"] = "skipped: cannot mount a tmpfs"
else:
    try:
        full = cope(*BASE, "--stop-after", "20", "--out", disk / "runs")
        full["stray_temporary_files"] = leftovers(disk)
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # space freed
        resumed = cope(*BASE, "--resume", "--out", disk / "runs")
        if resumed["exit"] == 0:
            resumed["max_abs_difference_to_uninterrupted"] = max_difference(
                run_dir(disk / "runs") / "checkpoint.pt", straight
            )
        report["full_disk"], report["full_disk_resume"] = full, resumed
    finally:
        subprocess.run(["umount", "-l", str(disk)])
shutil.rmtree(work, ignore_errors=True)
RESULT.parent.mkdir(parents=True, exist_ok=True)
RESULT.write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
