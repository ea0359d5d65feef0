"""`cope bench`: attention and training benchmarks measure, skip and report as specified."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cope_cli.bench import bench_app
from recipes.base import UserError
from recipes.engine import bench
from recipes.engine.bench import AttentionSetting, TrainSetting, bench_attention, bench_train

TINY = AttentionSetting(batch=1, heads=2, dim=16, npos=8, repeats=2, warmup=1)


def test_attention_bench_times_every_path_with_ratios_to_sdpa():
    results = bench_attention([64], ["sdpa", "reference", "blockwise"], TINY, isolate=False)
    assert [r.name for r in results] == ["sdpa", "reference", "blockwise"]
    assert all(r.time_ms and r.time_ms > 0 and r.peak_mib is not None for r in results)
    document = bench.results_json(results, "sdpa", {"setting": {}})
    sdpa = document["cases"][0]["ratios_to_sdpa"]
    assert sdpa["time"] == pytest.approx(1.0)
    blockwise = document["cases"][2]["ratios_to_sdpa"]
    assert blockwise["time"] == pytest.approx(results[2].time_ms / results[0].time_ms)


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
    # (B, H, T, T) float32 = 8 MiB per tensor at T=1024 and the reference keeps several.
    assert long.peak_mib > short.peak_mib + 16, (short.peak_mib, long.peak_mib)
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
    assert relative[("cope", None)]["throughput"] == pytest.approx(
        results[1].examples_per_s / results[0].examples_per_s
    )


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
