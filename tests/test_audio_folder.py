"""audio-folder: any rates and channel counts, corrupt files skipped and counted, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from audio_fixtures import write_wav

from recipes.audio_folder import AudioFolder
from recipes.base import UserError, pad_collate

CONFIG = {**AudioFolder.defaults, "data.seed": 0, "model.pe": "rope"}


def tone(seconds: float, rate: int, pitch: float, channels: int = 1) -> np.ndarray:
    wave = 0.3 * np.sin(2 * np.pi * pitch * np.arange(int(seconds * rate)) / rate)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def make_folder(root: Path, per_class: int = 10, corrupt: bool = True) -> Path:
    """Two classes; mixed rates (8, 16, 22.05, 44.1 kHz), WAV and FLAC, mono and stereo."""
    formats = [(8000, ".wav", 1), (16000, ".flac", 1), (22050, ".wav", 2), (44100, ".flac", 2)]
    for label, pitch in (("low", 300.0), ("high", 2000.0)):
        for number in range(per_class):
            rate, suffix, channels = formats[number % len(formats)]
            seconds = 0.5 + 0.1 * (number % 3)
            write_wav(
                root / label / f"clip{number}{suffix}", tone(seconds, rate, pitch, channels), rate
            )
    if corrupt:
        (root / "low" / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt nonsense")
    return root


def test_mixed_rates_and_channels_are_read_and_a_corrupt_file_is_counted(tmp_path: Path) -> None:
    bundle = AudioFolder().build_data(CONFIG, make_folder(tmp_path / "data"), False)
    assert bundle.skipped == 1
    sizes = [len(bundle.train), *(len(split.dataset) for split in bundle.splits.values())]
    assert sum(sizes) == 20 and sizes == [16, 2, 2]
    assert bundle.info["class_names"] == ["high", "low"]
    frames = {bundle.train[i]["inputs"].shape[0] for i in range(len(bundle.train))}
    assert frames == {51, 61, 71}  # 0.5/0.6/0.7 s at 16 kHz, 10 ms hop, whatever the file rate


def test_split_by_seed_is_stratified_and_reproducible(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", per_class=20, corrupt=False)
    recipe = AudioFolder()
    first = recipe.build_data(CONFIG, root, False)
    again = recipe.build_data(CONFIG, root, False)
    other = recipe.build_data({**CONFIG, "data.seed": 1}, root, False)
    val = first.splits["val"].dataset
    assert sorted(val.labels) == [0, 0, 1, 1]  # 10 % of each class
    assert val.indices == again.splits["val"].dataset.indices
    assert val.indices != other.splits["val"].dataset.indices


def test_split_by_list_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", corrupt=False)
    (root / "val.txt").write_text("low/clip0.wav\nhigh/clip1.flac\nhigh/clip2.wav\n")
    (root / "test.txt").write_text("low/clip3.flac\n")
    config = {**CONFIG, "data.val_list": "val.txt", "data.test_list": "test.txt"}
    bundle = AudioFolder().build_data(config, root, False)
    assert len(bundle.splits["val"].dataset) == 3
    assert bundle.splits["test"].dataset.labels == [1]
    assert len(bundle.train) == 16
    with pytest.raises(UserError, match="list file not found"):
        AudioFolder().build_data({**config, "data.test_list": "nope.txt"}, root, False)


def test_empty_or_missing_folders_are_user_errors(tmp_path: Path) -> None:
    recipe = AudioFolder()
    with pytest.raises(UserError, match="not found"):
        recipe.build_data(CONFIG, tmp_path / "missing", False)
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(UserError, match="no class sub-folders"):
        recipe.build_data(CONFIG, tmp_path / "empty", False)
    write_wav(tmp_path / "one" / "cats" / "a.wav", tone(0.2, 16000, 440.0), 16000)
    with pytest.raises(UserError, match="at least two"):
        recipe.build_data(CONFIG, tmp_path / "one", False)
    with pytest.raises(UserError, match="--data-dir"):
        recipe.build_data(CONFIG, None, False)


def test_model_classifies_padded_batches_of_different_lengths(tmp_path: Path) -> None:
    recipe = AudioFolder()
    bundle = recipe.build_data(CONFIG, make_folder(tmp_path / "data", corrupt=False), False)
    batch = pad_collate([bundle.train[i] for i in range(4)])
    assert batch["padding_mask"].any()
    model = recipe.build_model(CONFIG, bundle.info)
    assert model(batch["inputs"], batch["padding_mask"]).shape == (4, 2)


def test_cli_trains_on_an_audio_folder_and_counts_skipped_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cope_cli.app import app

    root = make_folder(tmp_path / "data")
    arguments = ["train", "audio-folder", "--pe", "abs", "--steps", "3"]
    arguments += ["--data-dir", str(root), "--out", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, [*arguments, "--set", "train.batch_size=4"])
    assert result.exit_code == 0, result.output
    assert "skipped 1" in result.output
    assert list((tmp_path / "runs" / "audio-folder" / "abs").glob("*/eval.json"))


def test_features_are_cached_in_data_cache_dir_not_in_the_data_folder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    AudioFolder().build_data({**CONFIG, "data.cache_dir": str(tmp_path / "cache")}, root, False)
    assert list((tmp_path / "cache").glob("*/features-*.pt"))
    assert not [path for path in root.rglob("*") if "cache" in path.name]


@pytest.fixture
def read_only_copy(tmp_path: Path):
    """The test folder bind-mounted read-only (root cannot be stopped by chmod alone)."""
    import os
    import shutil
    import subprocess

    source, view = make_folder(tmp_path / "data"), tmp_path / "read-only"
    view.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(source), str(view)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.strip()}")
    try:
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)


def test_a_read_only_data_folder_trains(read_only_copy: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cope_cli.app import app

    with pytest.raises(OSError):
        (read_only_copy / "probe").write_text("x")
    arguments = ["train", "audio-folder", "--pe", "rope", "--steps", "2"]
    arguments += ["--data-dir", str(read_only_copy), "--out", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, [*arguments, "--set", "train.batch_size=4"])
    assert result.exit_code == 0, result.output


def test_skipped_files_are_named_in_the_metrics_and_the_summary(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from cope_cli.app import app

    root = make_folder(tmp_path / "data")
    arguments = ["train", "audio-folder", "--pe", "abs", "--steps", "2", "--data-dir", str(root)]
    arguments += ["--out", str(tmp_path / "runs"), "--set", "train.batch_size=4"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "low/broken.wav" in " ".join(result.output.split())
    (metrics,) = (tmp_path / "runs").glob("audio-folder/abs/*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    (data,) = [record for record in records if record["kind"] == "data"]
    assert data["skipped"] == 1 and data["skipped_files"] == ["low/broken.wav"]


def test_the_summary_names_ten_skipped_files_then_counts_the_rest() -> None:
    from recipes.engine.trainer import name_skipped

    files = [f"c/{index}.wav" for index in range(13)]
    assert name_skipped(files) == ": " + ", ".join(files[:10]) + " and 3 more"
    assert name_skipped(files[:2]) == ": c/0.wav, c/1.wav" and name_skipped([]) == ""
