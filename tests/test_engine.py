"""The training engine: run directories, checkpoints, bit-exact resume, evaluation, reports."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import engine_helpers  # noqa: F401  (registers the tiny recipes)
import pytest
import torch

from recipes.base import UserError, get_recipe
from recipes.engine import rundir
from recipes.engine.checkpoint import load_checkpoint, save_checkpoint
from recipes.engine.config import resolve_config
from recipes.engine.evaluate import evaluate
from recipes.engine.report import build_report, summarise
from recipes.engine.sampler import ResumableBatchSampler
from recipes.engine.trainer import TrainingDiverged, TrainObserver, TrainOptions, train

TESTS = Path(__file__).parent


def tiny_config(recipe: str = "tiny-majority", **options: object) -> dict:
    """A resolved config of a tiny recipe, with ``options`` as --set overrides."""
    return resolve_config(get_recipe(recipe), cli_options={"model.pe": "abs"}, set_options=options)


def weights(run_dir: Path, name: str = rundir.CHECKPOINT_FILE) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / name)["model"]


def test_train_writes_a_complete_run_directory(tmp_path: Path) -> None:
    result = train(get_recipe("tiny-majority"), tiny_config(), TrainOptions(out=tmp_path))
    run = result.run_dir
    assert result.status == "finished" and result.step == 30
    assert run.parent == tmp_path / "tiny-majority" / "abs" and run.name.startswith("seed0-")
    for name in ("config.json", "env.json", "metrics.jsonl", "checkpoint.pt", "best.pt"):
        assert (run / name).is_file(), name
    assert rundir.is_finished(run)
    recipe, config = rundir.read_config(run)
    assert recipe == "tiny-majority" and config["train.steps"] == 30
    env = json.loads((run / "env.json").read_text())
    assert env["versions"]["torch"] == torch.__version__ and env["device"] == "cpu"
    records = rundir.read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20, 30]
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 10, 15, 20, 25, 30]
    evaluation = json.loads((run / "eval.json").read_text())
    assert set(evaluation["splits"]) == {"val", "test", "long"}
    assert evaluation["splits"]["long"]["ood"] is True
    assert evaluation["splits"]["test"]["count"] == 64
    # the task is easy: a model that learned nothing would sit near 0.5
    assert evaluation["splits"]["test"]["accuracy"] > 0.8


def test_final_evaluation_uses_the_best_checkpoint(tmp_path: Path) -> None:
    result = train(get_recipe("tiny-majority"), tiny_config(), TrainOptions(out=tmp_path))
    best = load_checkpoint(result.run_dir / "best.pt")
    assert result.evaluation["best_step"] == best["step"]
    assert result.evaluation["splits"]["val"]["accuracy"] == best["val"]["accuracy"]


def test_checkpoints_load_with_weights_only_and_hold_the_full_state(tmp_path: Path) -> None:
    result = train(get_recipe("tiny-majority"), tiny_config(), TrainOptions(out=tmp_path))
    state = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "sampler", "rng", "progress"} <= set(state)
    assert state["progress"]["step"] == 30 and state["recipe"] == "tiny-majority"
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


def test_resume_after_a_stop_is_bit_exact(tmp_path: Path) -> None:
    config = tiny_config()  # the stop itself writes the checkpoint at step 13
    straight = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path / "a"))
    stopped = train(
        get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path / "b", stop_after=13)
    )
    assert stopped.status == "stopped" and stopped.step == 13
    assert not rundir.is_finished(stopped.run_dir)
    resumed = train(
        get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path / "b", resume=True)
    )
    assert resumed.run_dir == stopped.run_dir and resumed.status == "finished"
    for name in ("checkpoint.pt", "best.pt"):
        expected, actual = weights(straight.run_dir, name), weights(resumed.run_dir, name)
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)
    assert straight.evaluation["splits"] == resumed.evaluation["splits"]
    env = json.loads((resumed.run_dir / "env.json").read_text())
    assert [entry["step"] for entry in env["resumed"]] == [13]
    train_steps = [r["step"] for r in rundir.read_metrics(resumed.run_dir) if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps))  # nothing logged twice


@pytest.mark.slow  # a subprocess importing torch plus two short trainings: ~20 s on 2 busy CPUs
def test_resume_after_sigkill_is_bit_exact(tmp_path: Path) -> None:
    """A real kill -9 mid-run, then --resume, ends with the same weights as a straight run."""
    options = {"train.steps": 120, "train.checkpoint_every": 7, "train.eval_every": 50}
    config = tiny_config(**options)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import engine_helpers\n"
        "from pathlib import Path\n"
        "from recipes.base import get_recipe\n"
        "from recipes.engine.config import resolve_config\n"
        "from recipes.engine.trainer import TrainOptions, train\n"
        f"config = resolve_config(get_recipe('tiny-majority'), cli_options={{'model.pe': 'abs'}},"
        f" set_options={options!r})\n"
        "train(get_recipe('tiny-majority'), config, TrainOptions(out=Path(sys.argv[2])))\n"
    )
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, str(TESTS), str(out)], env=env)
    try:
        deadline = time.time() + 120
        killed_at = None
        while time.time() < deadline and process.poll() is None:
            runs = rundir.find_runs(out)
            steps = [r["step"] for r in rundir.read_metrics(runs[0])] if runs else []
            if steps and max(steps) >= 20:
                process.send_signal(signal.SIGKILL)
                killed_at = max(steps)
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert killed_at is not None and killed_at < 120, "the run ended before it could be killed"
    (run,) = rundir.find_runs(out)
    assert not rundir.is_finished(run)
    resumed = train(get_recipe("tiny-majority"), config, TrainOptions(out=out, resume=True))
    assert resumed.run_dir == run and resumed.status == "finished"
    straight = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path / "straight"))
    expected, actual = weights(straight.run_dir), weights(run)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_resume_with_different_options_starts_a_new_run(tmp_path: Path) -> None:
    stopped = train(
        get_recipe("tiny-majority"), tiny_config(), TrainOptions(out=tmp_path, stop_after=5)
    )
    messages: list[str] = []

    class Collect(TrainObserver):
        def message(self, text: str) -> None:
            messages.append(text)

    other = tiny_config(**{"train.lr": 0.02})
    result = train(
        get_recipe("tiny-majority"), other, TrainOptions(out=tmp_path, resume=True), Collect()
    )
    assert result.run_dir != stopped.run_dir
    assert any("train.lr: 0.01 -> 0.02" in message for message in messages)


def test_a_finished_run_is_not_duplicated_unless_forced(tmp_path: Path) -> None:
    config = tiny_config(**{"train.steps": 5})
    first = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path))
    with pytest.raises(UserError, match="--force"):
        train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path))
    reused = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path, resume=True))
    assert reused.status == "reused" and reused.run_dir == first.run_dir
    forced = train(
        get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path, on_finished="new")
    )
    assert forced.run_dir != first.run_dir and rundir.is_finished(forced.run_dir)
    seed1 = train(
        get_recipe("tiny-majority"), {**config, "train.seed": 1}, TrainOptions(out=tmp_path)
    )
    assert seed1.run_dir.name.startswith("seed1-")


def test_run_directories_are_unique_when_created_in_the_same_second(tmp_path: Path) -> None:
    created = [rundir.create_run_dir(tmp_path, "r", "cope", 0) for _ in range(12)]
    assert len({path.name for path in created}) == 12
    for path in created:
        rundir.write_config(path, "r", {}, None, None)
    assert rundir.find_runs(tmp_path, "r", "cope", 0) == created  # oldest first, -10 after -9


def test_sampler_position_restores_the_same_order() -> None:
    sampler = ResumableBatchSampler(10, 4, seed=3)
    first = [sampler.next_batch() for _ in range(3)]
    state = sampler.state_dict()
    rest = [sampler.next_batch() for _ in range(5)]
    again = ResumableBatchSampler(10, 4, seed=3)
    again.load_state_dict(state)
    assert [again.next_batch() for _ in range(5)] == rest
    assert sum(first[:2], []) != list(range(8))  # shuffled, not in index order
    assert len(set(sum(first[:2], []))) == 8  # no index twice within an epoch
    other_seed = ResumableBatchSampler(10, 4, seed=4)
    assert [other_seed.next_batch() for _ in range(3)] != first


def test_sampler_splits_each_batch_between_ranks() -> None:
    ranks = [ResumableBatchSampler(16, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    single = ResumableBatchSampler(16, 8, seed=0)
    for _ in range(3):
        shares = [sampler.next_batch() for sampler in ranks]
        assert sorted(shares[0] + shares[1]) == sorted(single.next_batch())


def test_truncated_checkpoint_is_a_clear_user_error(tmp_path: Path) -> None:
    result = train(
        get_recipe("tiny-majority"), tiny_config(**{"train.steps": 3}), TrainOptions(out=tmp_path)
    )
    path = result.run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged or unreadable"):
        load_checkpoint(path)


def test_checkpoint_of_another_recipe_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "other.pt", {"recipe": "tiny-echo", "model": {}})
    with pytest.raises(UserError, match="belongs to recipe 'tiny-echo', not 'tiny-majority'"):
        load_checkpoint(tmp_path / "other.pt", "tiny-majority")


def test_checkpoint_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"recipe": "x", "model": {"w": torch.ones(2)}})
    save_checkpoint(tmp_path / "c.pt", {"recipe": "x", "model": {"w": torch.zeros(2)}})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model"]["w"], torch.zeros(2))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recipes.engine import trainer

    calls = {"n": 0}
    real = trainer.answer_loss

    def poisoned(logits: torch.Tensor, targets: torch.Tensor, count: int) -> torch.Tensor:
        calls["n"] += 1
        loss = real(logits, targets, count)
        return loss * math.nan if calls["n"] == 8 else loss

    monkeypatch.setattr(trainer, "answer_loss", poisoned)
    config = tiny_config(**{"train.checkpoint_every": 5, "train.eval_every": 100})
    with pytest.raises(TrainingDiverged, match="loss became nan at step 8"):
        train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path))
    (run,) = rundir.find_runs(tmp_path)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["progress"]["step"] == 5
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert not rundir.is_finished(run)


def test_early_stopping_ends_training_after_patience(tmp_path: Path) -> None:
    config = tiny_config(
        **{"train.steps": 200, "train.eval_every": 2, "train.patience": 2, "train.lr": 0.0}
    )
    result = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path))
    # lr 0: val never improves after the first evaluation, so training stops at step 6
    assert result.status == "finished" and result.step == 6
    assert result.evaluation["best_step"] == 2
    # killed after the early stop but before the final evaluation: resuming does not train on
    (result.run_dir / "done").unlink()
    resumed = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path, resume=True))
    assert resumed.run_dir == result.run_dir and resumed.step == 6
    assert rundir.is_finished(resumed.run_dir)


def test_epochs_replace_steps(tmp_path: Path) -> None:
    config = tiny_config(**{"train.epochs": 2, "data.train_size": 64, "train.batch_size": 16})
    result = train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path))
    assert result.step == 8  # 2 epochs x 64/16 batches


def test_token_accuracy_counts_only_asked_positions(tmp_path: Path) -> None:
    recipe = get_recipe("tiny-echo")
    config = resolve_config(recipe)
    bundle = recipe.build_data(config, None, False)

    class Echo(torch.nn.Module):
        """Right at every real token; padding (-100 targets) must not be counted."""

        def forward(self, inputs: torch.Tensor, padding_mask: torch.Tensor | None = None):
            logits = torch.nn.functional.one_hot(inputs, 5).float()
            if padding_mask is not None:
                logits[padding_mask] = torch.tensor([0.0, 0, 0, 0, 1])  # wrong on padding
            return logits

    dataset = bundle.splits["val"].dataset
    result = evaluate(Echo(), dataset, bundle.collate, batch_size=8, device=torch.device("cpu"))
    lengths = sum(len(item["inputs"]) for item in dataset.items)
    assert result["count"] == lengths and result["accuracy"] == 1.0


def test_cuda_requested_without_a_gpu_is_a_user_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="no CUDA GPU"):
        train(
            get_recipe("tiny-majority"),
            tiny_config(**{"train.device": "cuda"}),
            TrainOptions(out=tmp_path),
        )
    assert not (tmp_path / "tiny-majority").exists()  # nothing created before validation


def test_bad_data_options_fail_before_a_run_directory_exists(tmp_path: Path) -> None:
    config = tiny_config(**{"data.min_len": 9, "data.max_len": 3})
    with pytest.raises(UserError, match="min_len"):
        train(get_recipe("tiny-majority"), config, TrainOptions(out=tmp_path))
    assert rundir.find_runs(tmp_path) == [] and not any(tmp_path.rglob("seed*"))


def test_summary_gives_sample_std_and_t_interval() -> None:
    summary = summarise([1.0, 2.0, 3.0])
    assert summary["mean"] == 2.0 and summary["std"] == pytest.approx(1.0)
    half = 4.3026527297 / math.sqrt(3)  # t_{0.975, 2}
    assert summary["ci_low"] == pytest.approx(2.0 - half)
    assert summary["ci_high"] == pytest.approx(2.0 + half)
    assert math.isnan(summarise([0.5])["std"])
    clipped = summarise([0.9, 1.0, 1.0], bounds=(0.0, 1.0))
    assert clipped["ci_high"] == 1.0 and clipped["ci_low"] < clipped["mean"]


def test_report_groups_runs_that_differ_beyond_encoding_and_seed(tmp_path: Path) -> None:
    for pe in ("abs", "rope"):
        for seed in (0, 1):
            for lr in (0.01, 0.02):
                options = {"train.steps": 2, "train.lr": lr, "data.eval_size": 8}
                config = {**tiny_config(**options), "model.pe": pe}
                train(
                    get_recipe("tiny-majority"),
                    {**config, "train.seed": seed},
                    TrainOptions(out=tmp_path),
                )
    results, files = build_report([tmp_path], tmp_path / "report")
    assert len(results) == 2
    assert sorted(result["title"] for result in results) == [
        "tiny-majority (train.lr=0.01)",
        "tiny-majority (train.lr=0.02)",
    ]
    for result in results:
        assert result["pes"] == ["abs", "rope"]
        assert result["splits"]["test"]["by_pe"]["rope"]["n"] == 2
        assert list(result["splits"]) == ["val", "test", "long"]
    markdown = files["markdown"].read_text()
    assert "long (OOD)" in markdown and "| rope | 2 |" in markdown
    assert all(path.is_file() for path in files["plots"])
