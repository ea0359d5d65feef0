"""speech-commands: protocols and splits on a generated tree, features, cache, download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from audio_fixtures import OTHER_WORDS, RangeServer, speech_commands_tree, tar_gz

from recipes import _audio, speech_commands
from recipes._audio import FeatureSettings, MelAnalyzer, mix_noise_db, read_audio
from recipes.base import UserError, pad_collate
from recipes.speech_commands import SILENCE, TEN_WORDS, UNKNOWN, SpeechCommands

CONFIG = {**SpeechCommands.defaults, "data.seed": 0, "model.pe": "cope"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("sc")
    return data_dir, speech_commands_tree(data_dir / "speech_commands_v0.02", corrupt=True)


@pytest.fixture(scope="module")
def bundles(tree):
    data_dir, _ = tree
    recipe = SpeechCommands()
    return {
        protocol: recipe.build_data({**CONFIG, "data.protocol": protocol}, data_dir, False)
        for protocol in ("12", "35")
    }


def test_35_word_protocol_uses_every_word_and_the_list_files(bundles) -> None:
    bundle = bundles["35"]
    words = len(TEN_WORDS) + len(OTHER_WORDS)
    assert bundle.info["num_classes"] == words
    assert len(bundle.train) == words * 6  # the corrupt file is skipped, not fatal
    assert bundle.skipped == 1
    assert {name: len(split.dataset) for name, split in bundle.splits.items()} == {
        "val": words * 2,
        "test": words * 2,
        "speed": words * 2,
        "pad2s-silence": words * 2,
        "pad2s-noise": words * 2,
        "shifted": words * 2,
    }
    assert [name for name, split in bundle.splits.items() if split.ood] == [
        "speed",
        "pad2s-silence",
        "pad2s-noise",
        "shifted",
    ]


def test_12_class_protocol_maps_other_words_to_unknown_and_adds_silence(tree, bundles) -> None:
    _, written = tree
    bundle = bundles["12"]
    assert bundle.info["class_names"] == [*TEN_WORDS, UNKNOWN, SILENCE]
    # train: 10 words x 6, unknown and silence each the mean keyword count (6)
    assert len(bundle.train) == 60 + 6 + 6
    assert len(bundle.splits["val"].dataset) == 20 + 2 + 2
    assert len(bundle.splits["test"].dataset) == 20 + 2 + 2
    labels = bundle.train.labels
    assert labels.count(10) == 6 and labels.count(11) == 6
    # the keyword clips keep their word's label: recompute from the lists and folder names
    root = written.root
    expected = sorted(
        TEN_WORDS.index(written.words[rel])
        for rel in written.files["test"]
        if written.words[rel] in TEN_WORDS
    )
    test_labels = bundle.splits["test"].dataset.labels
    assert sorted(label for label in test_labels if label < 10) == expected
    assert root.name == "speech_commands_v0.02"


def test_silence_is_cut_from_background_noise_deterministically(tree, bundles) -> None:
    data_dir, written = tree
    train = bundles["12"].train
    silence = [i for i, label in enumerate(train.labels) if label == 11]
    levels = [float(train.mel_db[train.indices[i]].float().mean()) for i in silence]
    floor = 10 * np.log10(_audio.POWER_FLOOR)
    assert all(level > floor + 20 for level in levels)  # noise, not digital zeros
    assert len(set(levels)) == len(levels)  # different excerpts and gains
    _audio._MEMORY_CACHE.clear()
    again = SpeechCommands().build_data({**CONFIG, "data.protocol": "12"}, data_dir, False).train
    assert [float(again.mel_db[again.indices[i]].float().mean()) for i in silence] == levels


def test_44k_and_stereo_files_are_resampled_and_mixed_down(tree) -> None:
    _, written = tree
    high = read_audio(written.root / written.odd_files["44k"], 16000)
    stereo = read_audio(written.root / written.odd_files["stereo"], 16000)
    assert high.shape == (16000,) and stereo.shape == (16000,)
    channels, _ = soundfile.read(str(written.root / written.odd_files["stereo"]))
    left = torch.from_numpy(channels[:, 0]).float()
    assert torch.allclose(stereo, left * 0.75, atol=1e-4)  # mean of (x, x / 2)


def test_mfcc_and_logmel_match_torchaudio_transforms() -> None:
    wave = torch.randn(16000) * 0.1 + torch.sin(torch.arange(16000) * 0.2)
    mfcc = FeatureSettings(kind="mfcc", n_features=40, n_mels=40, win_ms=30.0, hop_ms=10.0)
    analyzer = MelAnalyzer(mfcc)
    expected = torchaudio.transforms.MFCC(16000, n_mfcc=40, melkwargs=mfcc.mel_kwargs())(wave).T
    assert torch.allclose(analyzer.finish(analyzer.mel_db(wave)), expected, atol=1e-3)
    logmel = FeatureSettings(kind="logmel", n_features=80, n_mels=80, win_ms=25.0, hop_ms=10.0)
    analyzer = MelAnalyzer(logmel)
    spectrogram = torchaudio.transforms.MelSpectrogram(16000, **logmel.mel_kwargs())(wave)
    expected = torchaudio.transforms.AmplitudeToDB("power", top_db=80.0)(spectrogram).T
    assert torch.allclose(analyzer.finish(analyzer.mel_db(wave)), expected, atol=1e-3)
    assert logmel.win_length == 400 and logmel.hop_length == 160


def test_noise_mixed_in_mel_power_matches_mixing_waveforms() -> None:
    generator = torch.Generator().manual_seed(0)
    clip = torch.sin(torch.arange(16000) * 0.3) * 0.3
    noise = torch.randn(16000, generator=generator) * 0.2
    analyzer = MelAnalyzer(FeatureSettings())
    for gain in (0.1, 0.5, 1.0):
        mixed = mix_noise_db(analyzer.mel_db(clip), analyzer.mel_db(noise), gain)
        direct = analyzer.mel_db(clip + gain * noise)
        # equal in expectation: per-bin dB differences average out near zero
        assert abs(float((mixed - direct).mean())) < 0.5
        assert float((mixed - direct).abs().median()) < 2.0


def test_feature_cache_is_reused_and_invalidated_by_settings(tree, bundles, monkeypatch) -> None:
    data_dir, written = tree
    cache_dir = _audio.feature_cache_dir(CONFIG, "speech-commands", written.root)
    before = set(cache_dir.glob("features-*.pt"))
    assert len(before) == 1  # both protocols share one cache
    _audio._MEMORY_CACHE.clear()
    calls = []
    real_build = speech_commands.build_cache
    monkeypatch.setattr(
        speech_commands, "build_cache", lambda *args: calls.append(args) or real_build(*args)
    )
    recipe = SpeechCommands()
    recipe.build_data(CONFIG, data_dir, False)
    assert calls == []  # read back from disk
    logmel = {**CONFIG, "data.features": "logmel", "data.n_features": 40}
    bundle = recipe.build_data(logmel, data_dir, False)
    assert calls == []  # same analysis: MFCC and log-mel are finished from one cache
    assert bundle.splits["val"].dataset[0]["inputs"].shape == (101, 40)
    recipe.build_data({**CONFIG, "data.win_ms": 25.0}, data_dir, False)
    assert len(calls) == 1  # a new window length makes a new cache
    assert len(set(cache_dir.glob("features-*.pt"))) == 2


def test_training_items_are_augmented_and_evaluation_items_are_not(bundles) -> None:
    bundle = bundles["12"]
    train, val = bundle.train, bundle.splits["val"].dataset
    assert not torch.equal(train[0]["inputs"], train[0]["inputs"])
    assert torch.equal(val[0]["inputs"], val[0]["inputs"])
    plain = _audio.FeatureDataset(
        train.mel_db, train.indices, train.labels, train.analyzer, train.mean, train.std
    )
    features = torch.stack([plain[i]["inputs"] for i in range(len(plain))])
    assert abs(float(features.mean())) < 0.1  # standardised with the training statistics


def test_ood_splits_change_length_or_timing_not_labels(bundles) -> None:
    bundle = bundles["35"]
    test = bundle.splits["test"].dataset
    lengths = {
        name: {bundle.splits[name].dataset[i]["inputs"].shape[0] for i in range(len(test))}
        for name in ("test", "speed", "pad2s-silence", "shifted")
    }
    assert lengths["test"] == {101} and lengths["shifted"] == {101}
    assert lengths["pad2s-silence"] == {201}
    assert max(lengths["speed"]) > 101  # slowed clips keep their whole length
    for name in ("speed", "pad2s-noise", "shifted"):
        assert bundle.splits[name].dataset.labels == test.labels
    assert bundle.info["max_len"] >= max(lengths["speed"]) + 1


def test_kwt1_preset_has_keyword_transformer_size(bundles) -> None:
    recipe = SpeechCommands()
    config = {**CONFIG, **recipe.presets["kwt1"], "model.pe": "rope"}  # RoPE has no weights
    model = recipe.build_model(config, bundles["12"].info)
    parameters = sum(p.numel() for p in model.parameters())
    # KWT-1 has ~607k parameters, 99 x 64 of them its learned position table
    assert 590_000 < parameters < 615_000
    batch = pad_collate([bundles["12"].splits["speed"].dataset[i] for i in range(4)])
    assert model(batch["inputs"], batch.get("padding_mask")).shape == (4, 12)


def test_torchaudios_layout_is_found_without_downloading(tmp_path: Path) -> None:
    folder = tmp_path / "SpeechCommands" / "speech_commands_v0.02"
    speech_commands_tree(folder, words=("yes", "no", "cat"), per_word=(2, 1, 1))
    assert speech_commands.find_root(tmp_path) == folder
    assert SpeechCommands().locate(tmp_path, download=False) == folder


def test_missing_data_is_a_user_error(tmp_path: Path) -> None:
    recipe = SpeechCommands()
    with pytest.raises(UserError, match="--data-dir"):
        recipe.build_data(CONFIG, None, False)
    with pytest.raises(UserError, match="--download"):
        recipe.build_data(CONFIG, tmp_path, False)
    with pytest.raises(UserError, match="protocol"):
        recipe.build_data({**CONFIG, "data.protocol": "20"}, tmp_path, False)


# ----------------------------------------------------------------------------- download


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("archive-src")
    speech_commands_tree(folder, words=("yes", "no", "cat"), per_word=(2, 1, 1))
    return tar_gz(folder, tmp_path_factory.mktemp("served") / "speech_commands_v0.02.tar.gz")


def point_recipe_at(monkeypatch, server: RangeServer, archive: Path, sha256: str | None) -> None:
    monkeypatch.setattr(SpeechCommands, "archive_url", server.url(archive.name))
    monkeypatch.setattr(SpeechCommands, "archive_sha256", sha256)
    monkeypatch.setattr(SpeechCommands, "archive_size", archive.stat().st_size)


def test_download_resumes_verifies_and_unpacks(tmp_path: Path, archive: Path, monkeypatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    payload = archive.read_bytes()
    (data_dir / (archive.name + ".part")).write_bytes(payload[: len(payload) // 3])
    with RangeServer(archive.parent) as server:
        point_recipe_at(monkeypatch, server, archive, speech_commands.sha256_of(archive))
        root = SpeechCommands().download(data_dir)
    assert server.requests[-1]["range"] == f"bytes={len(payload) // 3}-"
    assert (data_dir / archive.name).read_bytes() == payload
    assert root == data_dir / "speech_commands_v0.02"
    assert (root / "testing_list.txt").is_file() and (root / "yes").is_dir()
    assert not list(data_dir.glob(".speech_commands_v0.02.partial-*"))
    bundle = SpeechCommands().build_data({**CONFIG, "data.protocol": "35"}, data_dir, False)
    assert len(bundle.train) == 6


def test_bad_checksum_is_a_user_error_and_leaves_nothing(
    tmp_path: Path, archive: Path, monkeypatch
) -> None:
    with RangeServer(archive.parent) as server:
        point_recipe_at(monkeypatch, server, archive, "0" * 64)
        with pytest.raises(UserError, match="checksum mismatch"):
            SpeechCommands().download(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_no_network_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(SpeechCommands, "archive_url", "http://127.0.0.1:9/none.tar.gz")
    with pytest.raises(UserError, match="cannot download"):
        SpeechCommands().download(tmp_path)


def test_damaged_archive_is_a_user_error_and_unpacks_nothing(tmp_path: Path, archive: Path) -> None:
    broken = tmp_path / "speech_commands_v0.02.tar.gz"
    broken.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UserError, match="damaged"):
        SpeechCommands().download(tmp_path)
    assert not (tmp_path / "speech_commands_v0.02").exists()
    assert not list(tmp_path.glob(".speech_commands_v0.02.partial-*"))


def test_cli_trains_speech_commands_on_a_fixture_tree(tree, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cope_cli.app import app

    data_dir, _ = tree
    arguments = ["train", "speech-commands", "--pe", "rope", "--steps", "3"]
    arguments += ["--data-dir", str(data_dir), "--out", str(tmp_path / "runs")]
    arguments += ["--set", "train.batch_size=8", "--set", "data.protocol=35"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "skipped 1" in result.output  # the corrupt WAV
    assert list((tmp_path / "runs" / "speech-commands" / "rope").glob("*/eval.json"))


def test_cli_without_data_says_so_in_one_sentence(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cope_cli.app import app

    arguments = ["train", "speech-commands", "--steps", "1", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*arguments, "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "pass --download" in result.output and "Traceback" not in result.output


def test_specaugment_draws_the_same_masks_as_torchaudio() -> None:
    augmentation = _audio.Augmentation(
        freq_masks=2, freq_mask_width=7, time_masks=2, time_mask_width=25
    )
    features = torch.randn(101, 40) + 3.0
    for seed in range(5):
        torch.manual_seed(seed)
        ours = augmentation.apply_features(features)
        torch.manual_seed(seed)
        spec = features.T.unsqueeze(0)
        for _ in range(2):
            spec = torchaudio.transforms.FrequencyMasking(7)(spec)
        for _ in range(2):
            spec = torchaudio.transforms.TimeMasking(25)(spec)
        assert torch.equal(ours, spec.squeeze(0).T)
    assert not torch.equal(augmentation.apply_features(features), features)
