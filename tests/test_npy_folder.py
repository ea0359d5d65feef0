"""Specification of the `npy-folder` recipe: layout, splits, bad items, normalisation, model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.base import UserError, get_recipe, pad_collate

FEATURES = 5


def config(**overrides: object) -> dict:
    """The recipe's defaults on top of the engine's essentials."""
    recipe = get_recipe("npy-folder")
    return {
        "model.pe": "cope",
        "model.max_len": 512,
        "data.seed": 0,
        **recipe.defaults,
        **overrides,
    }


def write_folder(
    root: Path, per_class: int = 20, classes: tuple[str, ...] = ("down", "up")
) -> Path:
    """Class folders of random (time, features) arrays; each class has its own mean."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            frames = int(rng.integers(6, 15))
            array = rng.normal(loc=3.0 * label, scale=2.0, size=(frames, FEATURES))
            np.save(root / name / f"item{index:02d}.npy", array.astype(np.float32))
    return root


def keys(bundle, split: str) -> set[str]:
    dataset = bundle.train if split == "train" else bundle.splits[split].dataset
    return set(dataset.names)


def test_seeded_split_is_stratified_disjoint_and_fixed_by_the_data_seed(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data")
    recipe = get_recipe("npy-folder")
    options = config(**{"data.val_fraction": 0.2, "data.test_fraction": 0.1})
    bundle = recipe.build_data(options, root, False)
    train, val, test = keys(bundle, "train"), keys(bundle, "val"), keys(bundle, "test")
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 40
    for name in ("down", "up"):
        assert sum(key.startswith(f"{name}/") for key in val) == 4
        assert sum(key.startswith(f"{name}/") for key in test) == 2
    again = recipe.build_data(options, root, False)
    assert keys(again, "val") == val and keys(again, "test") == test
    other = recipe.build_data({**options, "data.seed": 1}, root, False)
    assert keys(other, "val") != val
    assert bundle.skipped == 0 and bundle.info["num_classes"] == 2
    assert bundle.info["class_names"] == ["down", "up"]


def test_list_files_decide_the_validation_and_test_items(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data")
    (root / "validation_list.txt").write_text("down/item00.npy\nup/item03.npy\n")
    (root / "testing_list.txt").write_text("up/item01.npy\n\n")
    bundle = get_recipe("npy-folder").build_data(config(), root, False)
    assert keys(bundle, "val") == {"down/item00.npy", "up/item03.npy"}
    assert keys(bundle, "test") == {"up/item01.npy"}
    assert len(keys(bundle, "train")) == 37
    labels = dict(
        zip(bundle.splits["val"].dataset.names, bundle.splits["val"].dataset.labels, strict=True)
    )
    assert labels == {"down/item00.npy": 0, "up/item03.npy": 1}


def test_a_single_list_file_is_a_user_error(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data")
    (root / "validation_list.txt").write_text("down/item00.npy\n")
    with pytest.raises(UserError, match="testing_list.txt"):
        get_recipe("npy-folder").build_data(config(), root, False)


def test_bad_items_are_skipped_counted_and_logged(tmp_path: Path, caplog) -> None:
    root = write_folder(tmp_path / "data")
    bad = root / "down"
    with_nan = np.ones((8, FEATURES), np.float32)
    with_nan[3, 1] = np.nan
    np.save(bad / "nan.npy", with_nan)
    np.save(bad / "rank3.npy", np.ones((2, 8, FEATURES), np.float32))
    np.save(bad / "strings.npy", np.array([["a"] * FEATURES] * 4))
    np.save(bad / "empty.npy", np.zeros((0, FEATURES), np.float32))
    np.save(bad / "narrow.npy", np.ones((8, FEATURES + 2), np.float32))
    (bad / "garbage.npy").write_bytes(b"not a numpy file at all")
    with caplog.at_level(logging.WARNING):
        bundle = get_recipe("npy-folder").build_data(config(), root, False)
    assert bundle.skipped == 6
    assert "skipped 6 of 46 files" in caplog.text
    everything = keys(bundle, "train") | keys(bundle, "val") | keys(bundle, "test")
    assert len(everything) == 40
    assert not any(
        key.split("/")[1].startswith(("nan", "rank3", "str", "empty", "narrow", "garb"))
        for key in everything
    )
    reasons = bundle.info["skipped_reasons"]
    assert reasons["unreadable"] == 1 and reasons["NaN or infinite values"] == 1


def test_missing_empty_or_unset_folders_are_one_sentence_user_errors(tmp_path: Path) -> None:
    recipe = get_recipe("npy-folder")
    with pytest.raises(UserError, match="does not exist"):
        recipe.build_data(config(), tmp_path / "nowhere", False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        recipe.build_data(config(), tmp_path / "empty", False)
    root = write_folder(tmp_path / "data")
    (root / "silent").mkdir()
    with pytest.raises(UserError, match="holds no npy files"):
        recipe.build_data(config(), root, False)
    with pytest.raises(UserError, match="--data-dir"):
        recipe.build_data(config(), None, False)


def test_folders_starting_with_underscore_are_not_classes(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data")
    (root / "_background_noise_").mkdir()
    bundle = get_recipe("npy-folder").build_data(config(), root, False)
    assert bundle.info["class_names"] == ["down", "up"]


def test_features_are_standardised_with_training_statistics(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data")
    bundle = get_recipe("npy-folder").build_data(config(), root, False)
    frames = torch.cat([bundle.train[i]["inputs"] for i in range(len(bundle.train))])
    assert frames.dtype == torch.float32 and frames.shape[1] == FEATURES
    assert torch.allclose(frames.mean(0), torch.zeros(FEATURES), atol=1e-4)
    assert torch.allclose(frames.std(0), torch.ones(FEATURES), atol=1e-2)
    raw = get_recipe("npy-folder").build_data(config(**{"data.normalize": False}), root, False)
    assert raw.train[0]["inputs"].abs().max() > 0
    assert not torch.allclose(raw.train[0]["inputs"], bundle.train[0]["inputs"])


@pytest.mark.parametrize(("pe", "stack"), [("cope", 1), ("abs", 2)])
def test_model_classifies_a_padded_batch(tmp_path: Path, pe: str, stack: int) -> None:
    root = write_folder(tmp_path / "data")
    recipe = get_recipe("npy-folder")
    options = config(**{"model.pe": pe, "data.stack": stack})
    bundle = recipe.build_data(options, root, False)
    model = recipe.build_model(options, bundle.info)
    batch = pad_collate([bundle.train[i] for i in range(4)])
    assert "padding_mask" in batch
    logits = model(batch["inputs"], batch["padding_mask"])
    assert logits.shape == (4, 2)
    assert torch.isfinite(logits).all()
    assert batch["targets"].shape == (4,)


def test_items_longer_than_max_len_are_a_user_error_naming_the_fix(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "data")
    recipe = get_recipe("npy-folder")
    options = config(**{"model.max_len": 8})
    bundle = recipe.build_data(options, root, False)
    with pytest.raises(UserError, match="model.max_len"):
        recipe.build_model(options, bundle.info)


def test_time_resampling_changes_the_length_and_keeps_the_trajectory() -> None:
    from recipes.npy_folder import resample_time

    ramp = torch.stack([torch.linspace(0, 9, 10), torch.linspace(5, -4, 10)], dim=1)
    for scale in (0.5, 2.0, 3.0):
        resampled = resample_time(ramp, scale)
        assert resampled.shape == (round(10 * scale), 2)  # duration ratio, same features
        torch.testing.assert_close(resampled[[0, -1]], ramp[[0, -1]])
        expected = torch.stack([torch.linspace(0, 9, len(resampled))] * 2, dim=1)
        expected[:, 1] = 5 - expected[:, 0]
        torch.testing.assert_close(resampled, expected)  # a ramp stays the same ramp


def test_ood_time_splits_hold_the_test_items_resampled(tmp_path: Path) -> None:
    bundle = get_recipe("npy-folder").build_data(
        config(**{"data.ood_time_scales": "0.5,2"}), write_folder(tmp_path / "data"), False
    )
    test = bundle.splits["test"].dataset
    for name, scale in (("time-x0.5", 0.5), ("time-x2", 2.0)):
        split = bundle.splits[name]
        assert split.ood and split.dataset.labels == test.labels
        for item, original in zip(split.dataset.arrays, test.arrays, strict=True):
            assert item.shape == (round(original.shape[0] * scale), FEATURES)
    with pytest.raises(UserError, match="ood_time_scales"):
        get_recipe("npy-folder").build_data(
            config(**{"data.ood_time_scales": "fast"}), tmp_path / "data", False
        )
