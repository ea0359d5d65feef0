"""The summary of one ``scripts/gpu_check.sh`` run, as Markdown, from the files it wrote.

Usage: ``python scripts/gpu_summary.py DEST [ELAPSED_S]``. Reads DEST/steps.tsv (step, exit code,
seconds), cuda_tests.xml, bench_attention.json, bench_train_w*.json, feed_rate.log and
nvidia_smi.csv; a missing file shows as "not measured", never as a crash.
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

TARGET_TIME, STRETCH_TIME, TARGET_MEMORY, TARGET_BUSY = 1.5, 1.2, 1.2, 0.9


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps(dest: Path) -> list[str]:
    lines = ["| step | exit | seconds |", "|---|---|---|"]
    path = dest / "steps.tsv"
    for row in path.read_text().splitlines() if path.is_file() else []:
        name, code, seconds = row.split("\t")
        if code == "0" or code.startswith("skipped"):
            state = "ok" if code == "0" else code
        else:
            state = "TIMEOUT" if code in ("124", "137") else f"FAILED ({code})"
        lines.append(f"| {name} | {state} | {seconds} |")
    return lines


def cuda_tests(dest: Path) -> list[str]:
    try:
        suite = ElementTree.parse(dest / "cuda_tests.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return ["CUDA tests: not measured"]
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        case.get("name", "?")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    line = f"CUDA tests: {passed} passed, {len(failed)} failed, {counts['skipped']} skipped"
    return [line] + [f"- failed: {name}" for name in failed]


def attention(dest: Path) -> list[str]:
    document = _json(dest / "bench_attention.json")
    if not document:
        return ["Attention: not measured"]
    cases = {(c["name"], c["length"]): c for c in document["cases"]}
    setting = document["setting"]
    lines = [
        f"Attention fwd+bwd, {setting['dtype']}, B={setting['batch']} H={setting['heads']} "
        f"D={setting['dim']}, causal={setting['causal']} on {setting['device']} "
        f"(targets: time <= {TARGET_TIME}x flash, stretch {STRETCH_TIME}x; memory <= "
        f"{TARGET_MEMORY}x)",
        "",
        "| T | flash ms | triton ms | time x | flash MiB | triton MiB | memory x |",
        "|---|---|---|---|---|---|---|",
    ]
    for length in sorted({length for _, length in cases}):
        flash, triton = cases.get(("flash", length)), cases.get(("triton", length))

        def cell(case: Any, key: str) -> str:
            if not case or case.get("skipped"):
                return (case or {}).get("skipped") or "-"
            return f"{case[key]:.2f}"

        ratio_t = ratio_m = "-"
        if flash and triton and not flash.get("skipped") and not triton.get("skipped"):
            ratio_t = f"{triton['time_ms'] / flash['time_ms']:.2f}"
            ratio_m = f"{triton['peak_mib'] / max(flash['peak_mib'], 1e-9):.2f}"
        lines.append(
            f"| {length} | {cell(flash, 'time_ms')} | {cell(triton, 'time_ms')} | {ratio_t} | "
            f"{cell(flash, 'peak_mib')} | {cell(triton, 'peak_mib')} | {ratio_m} |"
        )
    return lines


def training(dest: Path) -> list[str]:
    lines = [
        f"speech-commands kwt1 training, fed as in `cope train` (target: GPU busy >= "
        f"{TARGET_BUSY:.0%})",
        "",
        "| workers | pe | examples/s | step ms | data wait | GPU busy | NVML util |",
        "|---|---|---|---|---|---|---|",
    ]
    found = False
    for path in sorted(dest.glob("bench_train_w*.json")):
        document = _json(path)
        for case in (document or {}).get("cases", []):
            found = True
            extra = case.get("extra") or {}
            if case.get("skipped"):
                lines.append(f"| {path.stem[13:]} | {case['name']} | {case['skipped']} |||||")
                continue

            def share(key: str, extra: dict = extra) -> str:
                value = extra.get(key)
                return "-" if value is None else f"{value:.0%}"

            lines.append(
                f"| {extra.get('workers')} | {case['name']} | {case['examples_per_s']:.0f} | "
                f"{case['time_ms']:.1f} | {share('data_wait_fraction')} | {share('gpu_busy')} | "
                f"{share('gpu_utilization')} |"
            )
    smi = dest / "nvidia_smi.csv"
    if smi.is_file():
        samples = []
        for row in smi.read_text().splitlines():
            parts = [part.strip() for part in row.split(",")]
            if len(parts) >= 2 and parts[1].endswith("%"):
                samples.append(float(parts[1].rstrip(" %")))
        if samples:
            mean = statistics.fmean(samples)
            lines += ["", f"nvidia-smi utilisation over both runs: mean {mean:.0f} %"]
    return lines if found else ["Training: not measured"]


def feed_rate(dest: Path) -> list[str]:
    path = dest / "feed_rate.log"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.startswith('{"workers"'):
            rows.append(json.loads(line))
    if not rows:
        return ["Feed rate: not measured"]
    text = ", ".join(f"{r['workers']} workers {r['items_per_s']:.0f} items/s" for r in rows)
    return [f"Feed-only rate (batch {rows[0]['batch_size']}, CPU): {text}"]


def main() -> None:
    dest = Path(sys.argv[1])
    elapsed = sys.argv[2] if len(sys.argv) > 2 else "?"
    sections = [
        [f"# gpu_check summary ({dest}, {elapsed} s in all)"],
        steps(dest),
        cuda_tests(dest),
        attention(dest),
        training(dest),
        feed_rate(dest),
    ]
    print("\n\n".join("\n".join(section) for section in sections))


if __name__ == "__main__":
    main()
