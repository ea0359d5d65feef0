"""`cope bench`: attention and training benchmarks measure, skip and report as specified."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cope_cli.bench import bench_app
from recipes.base import UserError
from recipes.engine import bench
from recipes.engine.bench import (
    AttentionSetting,
    CaseResult,
    TrainSetting,
    bench_attention,
    bench_train,
)

TINY = AttentionSetting(batch=1, heads=2, dim=16, npos=8, repeats=2, warmup=1)


def test_attention_bench_times_every_path_and_reports_ratios_to_sdpa():
    results = bench_attention([64], ["sdpa", "reference", "blockwise"], TINY, isolate=False)
    assert [r.name for r in results] == ["sdpa", "reference", "blockwise"]
    assert all(r.time_ms and r.time_ms > 0 and r.peak_mib is not None for r in results)
    document = bench.results_json(results, "sdpa", {"setting": {}})
    assert [case["name"] for case in document["cases"]] == ["sdpa", "reference", "blockwise"]
    assert all(case["ratios_to_sdpa"]["time"] > 0 for case in document["cases"])


def test_ratios_divide_by_the_baseline_at_the_same_length_and_leave_out_skipped_cases():
    results = [
        CaseResult("sdpa", 64, time_ms=10.0, peak_mib=4.0),
        CaseResult("sdpa", 128, time_ms=40.0, peak_mib=0.0),
        CaseResult("blockwise", 64, time_ms=25.0, peak_mib=6.0),
        CaseResult("blockwise", 128, time_ms=60.0, peak_mib=3.0),
        CaseResult("reference", 128, skipped="skipped (est. 9 GiB)"),
    ]
    relative = bench.ratios(results, "sdpa")
    assert relative[("sdpa", 64)] == {
        "time": 1.0,
        "memory": 1.0,
        "throughput": None,
        "cpu_time": None,
    }
    assert relative[("blockwise", 64)] == {
        "time": 2.5,
        "memory": 1.5,
        "throughput": None,
        "cpu_time": None,
    }
    # A zero baseline peak gives no memory ratio rather than a division by zero.
    assert relative[("blockwise", 128)] == {
        "time": 1.5,
        "memory": None,
        "throughput": None,
        "cpu_time": None,
    }
    assert ("reference", 128) not in relative
    document = bench.results_json(results, "sdpa", {})
    assert [case["ratios_to_sdpa"] for case in document["cases"]][-1] is None


def test_attention_bench_skips_the_reference_where_it_would_need_too_much_memory(monkeypatch):
    monkeypatch.setattr(bench, "REFERENCE_LIMIT_GIB", 1e-4)
    results = bench_attention([128], ["reference"], TINY, isolate=False)
    assert results[0].skipped is not None
    assert results[0].skipped.startswith("skipped (est.")
    assert "GiB" in results[0].skipped
    assert results[0].time_ms is None


def test_attention_bench_skips_triton_on_cpu():
    results = bench_attention([32], ["triton"], TINY, isolate=False)
    assert results[0].skipped in ("skipped (needs CUDA)", "skipped (triton not installed)")


def test_attention_bench_measures_peak_memory_in_a_fresh_subprocess():
    # Two lengths of the reference: its (T, T) tensors make the peak grow with T.
    results = bench_attention([64, 1024], ["reference"], TINY, isolate=True, timeout=300)
    short, long = results
    assert short.skipped is None and long.skipped is None, (short.skipped, long.skipped)
    # The reference keeps about ten (B, H, T, T) tensors; at T=1024 one float32 tensor alone is
    # 8 MiB, so the peak must rise by at least that (a bound that load cannot lower).
    one_square = TINY.batch * TINY.heads * 1024 * 1024 * 4 / 2**20
    assert long.peak_mib >= short.peak_mib + one_square, (short.peak_mib, long.peak_mib)
    assert len(long.extra["times_ms"]) == TINY.repeats


def test_unknown_attention_path_is_a_user_error():
    with pytest.raises(UserError, match="blockwise"):
        bench_attention([32], ["flash9"], TINY, isolate=False)


def test_bench_attention_command_prints_json():
    result = CliRunner().invoke(
        bench_app,
        ["attention", "--seq", "32", "--impl", "sdpa,blockwise", "--heads", "1", "--dim", "16"]
        + ["--npos", "4", "--repeats", "1", "--warmup", "0", "--json"],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [case["name"] for case in document["cases"]] == ["sdpa", "blockwise"]
    assert document["baseline"] == "sdpa"
    assert document["setting"]["npos"] == 4


def test_bench_attention_command_rejects_bad_lengths_with_one_line():
    result = CliRunner().invoke(bench_app, ["attention", "--seq", "12,abc"])
    assert result.exit_code == 2
    assert "--seq" in result.output


def test_train_bench_reports_throughput_relative_to_abs():
    setting = TrainSetting(
        recipe="counting", steps=2, warmup=1, batch_size=4, set_options={"data.eval_size": 8}
    )
    results = bench_train(["abs", "cope"], setting, isolate=False)
    assert [r.name for r in results] == ["abs", "cope"]
    assert all(r.examples_per_s and r.examples_per_s > 0 for r in results)
    relative = bench.ratios(results, "abs")
    assert relative[("abs", None)]["throughput"] == pytest.approx(1.0)
    assert relative[("cope", None)]["throughput"] > 0


def test_train_bench_rejects_unknown_encodings():
    with pytest.raises(UserError, match="position encoding"):
        bench_train(["cope", "nonsense"], TrainSetting(recipe="counting"), isolate=False)


def test_calibration_runs_merge_their_lengths_into_their_direction():
    def document(causal, cases):
        setting = {"batch": 2, "heads": 2, "causal": causal}
        return {"setting": setting, "command": "cope bench", "commit": "c", "cases": cases}

    first = document(True, [
        {"name": "sdpa", "length": 64, "time_ms": 1.0},
        {"name": "reference", "length": 64, "time_ms": 12.0},
        {"name": "fused", "length": 64, "time_ms": 8.0},
    ])  # fmt: skip
    table = bench.calibration_table(first, {})
    assert table["causal"]["ms_per_head"] == {"reference": [3.0], "fused": [2.0]}  # per B*H
    longer = document(True, [{"name": "fused", "length": 1024, "time_ms": 400.0}])
    merged = bench.calibration_table(longer, table)
    assert merged["causal"]["lengths"] == [64, 1024]
    assert merged["causal"]["ms_per_head"] == {"reference": [3.0, None], "fused": [2.0, 100.0]}
    assert len(merged["causal"]["runs"]) == 2
    other = bench.calibration_table(document(False, [first["cases"][2]]), merged)
    assert other["causal"] == merged["causal"] and other["bidirectional"]["lengths"] == [64]


def test_bench_show_prints_a_saved_benchmark_as_markdown_with_its_command(tmp_path):
    saved = tmp_path / "attention.json"
    runner = CliRunner()
    measured = runner.invoke(
        bench_app,
        ["attention", "--seq", "32", "--impl", "sdpa,blockwise", "--heads", "1", "--dim", "16"]
        + ["--npos", "4", "--repeats", "1", "--warmup", "0", "--in-process", "--save", str(saved)],
    )
    assert measured.exit_code == 0, measured.output
    document = json.loads(saved.read_text())
    shown = runner.invoke(bench_app, ["show", str(saved), "--markdown"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith(f"`{document['command']}` (")
    rows = [line for line in lines if line.startswith("| 32 |")]
    blockwise = document["cases"][1]
    ratios = blockwise["ratios_to_sdpa"]
    memory = "-" if ratios["memory"] is None else f"{ratios['memory']:.2f}x"  # in-process: may be 0
    assert rows[1] == (
        f"| 32 | blockwise | {blockwise['time_ms']:,.1f} | {ratios['time']:.2f}x | "
        f"{blockwise['peak_mib']:,.1f} | {memory} |"
    )
    (tmp_path / "other.json").write_text('{"cases": 3}')
    bad = runner.invoke(bench_app, ["show", str(tmp_path / "other.json")])
    assert bad.exit_code == 2 and "is not a benchmark saved by" in bad.output
