"""audio-folder's OOD splits: each waveform transform changes what it says and nothing else."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from audio_fixtures import write_wav

from recipes._audio import change_speed, fit_length, time_stretch
from recipes.audio_folder import AudioFolder, OodSettings, pad_clip
from recipes.base import UserError

RATE = 16000
CONFIG = {**AudioFolder.defaults, "data.seed": 0, "model.pe": "rope"}


def sine(seconds: float, pitch: float, rate: int = RATE) -> torch.Tensor:
    return 0.3 * torch.sin(2 * math.pi * pitch * torch.arange(int(seconds * rate)) / rate)


def dominant_frequency(wave: torch.Tensor, rate: int = RATE) -> float:
    """The frequency of the largest bin of a Hann-windowed FFT."""
    magnitude = torch.fft.rfft(wave * torch.hann_window(wave.shape[-1])).abs()
    return float(magnitude.argmax()) * rate / wave.shape[-1]


@pytest.mark.parametrize("factor", [0.5, 0.8, 2.0])
def test_time_stretch_changes_the_duration_and_keeps_the_pitch(factor: float) -> None:
    wave = sine(1.0, 440.0)
    stretched = time_stretch(wave, factor, RATE)
    assert stretched.shape[-1] / wave.shape[-1] == pytest.approx(factor, rel=0.01)
    assert dominant_frequency(stretched) == pytest.approx(440.0, rel=0.02)
    # the level is kept too: the middle's RMS stays that of the tone (0.3 / sqrt 2)
    middle = stretched[stretched.shape[-1] // 4 : -stretched.shape[-1] // 4]
    assert float(middle.pow(2).mean().sqrt()) == pytest.approx(0.3 / math.sqrt(2), rel=0.1)


def test_time_stretch_keeps_the_envelope_in_place_relative_to_the_duration() -> None:
    wave = torch.cat([sine(0.5, 440.0), torch.zeros(RATE // 2)])  # tone, then silence
    stretched = time_stretch(wave, 2.0, RATE)
    energy = stretched.pow(2)
    first, second = energy[: RATE // 1], energy[RATE + RATE // 10 :]
    assert float(first.mean()) > 100 * float(second.mean())  # the tone ends at 1 s, not 0.5 s


@pytest.mark.parametrize("factor", [0.5, 1.5, 2.0])
def test_speed_change_moves_the_pitch_and_the_duration_together(factor: float) -> None:
    wave = sine(1.0, 440.0)
    fast = change_speed(wave, factor, RATE)
    assert fast.shape[-1] / wave.shape[-1] == pytest.approx(1 / factor, rel=0.01)
    assert dominant_frequency(fast) == pytest.approx(440.0 * factor, rel=0.02)


@pytest.mark.parametrize("noise_level", [0.0, 0.1])
def test_padding_adds_samples_around_the_original_ones_and_keeps_them(noise_level: float) -> None:
    wave = sine(0.5, 440.0)
    added = RATE // 2
    padded = pad_clip(wave, np.random.default_rng(0), added, noise_level)
    assert padded.shape[-1] == wave.shape[-1] + added
    start = int(np.random.default_rng(0).integers(added + 1))  # the same draw
    torch.testing.assert_close(padded[start : start + wave.shape[-1]], wave)
    outside = torch.cat([padded[:start], padded[start + wave.shape[-1] :]])
    rms = float(outside.pow(2).mean().sqrt())
    assert rms == pytest.approx(noise_level * 0.3 / math.sqrt(2), rel=0.05, abs=1e-9)


@pytest.mark.parametrize("shift_ms", [120.0, -50.0])
def test_shift_moves_the_onset_by_the_stated_amount_and_keeps_the_length(shift_ms: float) -> None:
    wave = torch.cat([torch.zeros(RATE // 4), sine(0.5, 440.0), torch.zeros(RATE // 4)])
    ((transform, _),) = OodSettings(ood_shift_ms=shift_ms).transforms(RATE).values()
    shifted = transform(wave, np.random.default_rng(0))
    onset = int(torch.nonzero(shifted.abs() > 1e-3)[0])
    assert shifted.shape == wave.shape
    assert onset - RATE // 4 == pytest.approx(shift_ms * RATE / 1000, abs=2)
    moved = fit_length(wave, wave.shape[-1], round(shift_ms * RATE / 1000))
    torch.testing.assert_close(shifted, moved)  # the same samples, only moved


def test_no_ood_split_unless_asked_and_malformed_lists_are_user_errors() -> None:
    assert OodSettings().transforms(RATE) == {}
    names = OodSettings("0.5,2", "1.5", 1.0, 0.1, 100.0).transforms(RATE)
    assert list(names) == [
        "stretch-x0.5",
        "stretch-x2",
        "speed-x1.5",
        "pad-1s-silence",
        "pad-1s-noise",
        "shift-100ms",
    ]
    for bad in ({"ood_stretch": "slow"}, {"ood_speed": "0,2"}, {"ood_pad_seconds": -1.0}):
        with pytest.raises(UserError, match="data.ood_"):
            OodSettings(**bad)


def make_folder(root: Path, per_class: int = 6) -> Path:
    for label, pitch in (("low", 300.0), ("high", 2000.0)):
        for number in range(per_class):
            write_wav(root / label / f"clip{number}.wav", sine(0.5, pitch).numpy(), RATE)
    return root


def test_ood_splits_hold_the_transformed_test_files_with_the_same_labels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data")
    options = {"data.cache_dir": str(tmp_path / "cache"), "data.ood_stretch": "2"}
    options |= {"data.ood_speed": "2", "data.ood_pad_seconds": 0.5, "data.ood_shift_ms": 100.0}
    cache = tmp_path / "cache"
    plain = AudioFolder().build_data({**CONFIG, "data.cache_dir": str(cache)}, root, False)
    before = sorted(path.name for path in cache.rglob("*.pt"))
    bundle = AudioFolder().build_data({**CONFIG, **options}, root, False)
    assert list(plain.splits) == ["val", "test"]  # off by default
    # the training features are the same cache file; each OOD split is one more file
    assert sorted(path.name for path in cache.rglob("features-*.pt")) == before
    assert len(list(cache.rglob("ood-*.pt"))) == 5
    test = bundle.splits["test"].dataset
    frames = test.mel_db.length(test.indices[0])  # 0.5 s at a 10 ms hop: 51 frames
    expected = {
        "stretch-x2": 2 * frames - 1,
        "speed-x2": frames // 2 + 1,
        "pad-0.5s-silence": 2 * frames - 1,
        "pad-0.5s-noise": 2 * frames - 1,
        "shift-100ms": frames,
    }
    for name, length in expected.items():
        split = bundle.splits[name]
        assert split.ood and split.dataset.labels == test.labels
        assert len(split.dataset) == len(test)
        assert split.dataset[0]["inputs"].shape == (length, test[0]["inputs"].shape[1])
    assert bundle.info["max_len"] >= expected["stretch-x2"] // 2
    with pytest.raises(UserError, match="data.ood_speed"):
        AudioFolder().build_data({**CONFIG, "data.ood_speed": "fast"}, root, False)


def test_cli_trains_and_evaluates_an_audio_folder_ood_split(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cope_cli.app import app

    root = make_folder(tmp_path / "data")
    arguments = ["train", "audio-folder", "--pe", "rope", "--steps", "2"]
    arguments += ["--data-dir", str(root), "--out", str(tmp_path / "runs")]
    for option in ("train.batch_size=4", "data.ood_stretch=2"):
        arguments += ["--set", option]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs" / "audio-folder" / "rope").glob("*/eval.json")
    assert "stretch-x2" in json.loads(run.read_text())["splits"]
    # a split the run was not trained with, chosen at evaluation time
    evaluate = ["eval", str(run.parent), "--split", "shift-100ms", "--json"]
    result = CliRunner().invoke(app, [*evaluate, "--set", "data.ood_shift_ms=100"])
    assert result.exit_code == 0, result.output
    assert "shift-100ms" in json.loads(result.output[result.output.index("{") :])["splits"]
