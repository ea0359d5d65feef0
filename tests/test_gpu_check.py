"""scripts/gpu_check.sh: refuses clearly without CUDA; its summary reads what the steps wrote.

The full CPU dry run (``scripts/gpu_check.sh --cpu-dry-run``, ~5 minutes here) is not part of
the suite; these checks cover the script's syntax, its refusal and the summary's arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_script_is_valid_bash_and_documents_its_options() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--cpu-dry-run" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_without_cuda_the_script_stops_with_one_error_line(tmp_path: Path) -> None:
    env = {**os.environ, "COPE_PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: no CUDA GPU") and "--cpu-dry-run" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_unknown_option_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: unknown option --gpu")


def case(name: str, length: int | None, time_ms: float, peak: float, **extra) -> dict:
    return {"name": name, "length": length, "time_ms": time_ms, "peak_mib": peak,
            "examples_per_s": 512 / time_ms * 1e3, "skipped": None, "extra": extra}  # fmt: skip


def test_summary_reports_ratios_to_flash_and_the_gpu_busy_share(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text("cuda_tests\t0\t80\nbench_attention\t124\t150\n")
    setting = {"dtype": "bfloat16", "batch": 2, "heads": 8, "dim": 64, "causal": True,
               "device": "cuda"}  # fmt: skip
    attention = [case("flash", 4096, 2.0, 100.0), case("triton", 4096, 3.0, 110.0)]
    (tmp_path / "bench_attention.json").write_text(
        json.dumps({"setting": setting, "cases": attention})
    )
    fed = case("cope", None, 40.0, 900.0, workers=8, data_wait_fraction=0.02, gpu_busy=0.95)
    (tmp_path / "bench_train_w8.json").write_text(json.dumps({"cases": [fed]}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), str(tmp_path), "300"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    text = done.stdout
    assert "| bench_attention | TIMEOUT | 150 |" in text
    assert "| 4096 | 2.00 | 3.00 | 1.50 | 100.00 | 110.00 | 1.10 |" in text
    assert "| 8 | cope | 12800 | 40.0 | 2% | 95% | - |" in text
    assert "CUDA tests: not measured" in text and "Feed rate: not measured" in text


def test_summary_of_an_empty_folder_says_nothing_was_measured(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), str(tmp_path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.count("not measured") == 4
