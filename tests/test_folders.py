"""recipes/folders.py: the listing and splitting every folder recipe shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes import folders
from recipes.audio_folder import AudioFolder
from recipes.base import UserError, get_recipe
from recipes.folders import SplitSettings, assign_splits, find_class_files, read_list
from recipes.video_folder import VideoFolder


def make_tree(root: Path, suffix: str, per_class: dict[str, int]) -> Path:
    """Empty files ``<class>/item<N><suffix>``: listing and splitting never open them."""
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for number in range(count):
            (root / name / f"item{number:02d}{suffix}").write_bytes(b"")
    return root


def stems(assignment: folders.Assignment) -> dict[str, list[str]]:
    return {
        split: [relative.rsplit(".", 1)[0] for relative, _ in members]
        for split, members in assignment.items()
    }


def test_the_same_files_are_split_identically_whatever_their_kind(tmp_path: Path) -> None:
    counts = {"cat": 17, "dog": 9, "owl": 3}
    settings = SplitSettings(val_fraction=0.2, test_fraction=0.1, seed=5)
    splits = []
    for suffix in (".wav", ".mp4", ".npy"):
        root = make_tree(tmp_path / suffix.lstrip("."), suffix, counts)
        classes = find_class_files(root, (suffix,), suffix)
        splits.append(stems(assign_splits(root, classes, settings)))
    assert splits[0] == splits[1] == splits[2]


def test_seeded_split_is_stratified_disjoint_and_fixed_by_the_seed(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ".npy", {"cat": 20, "dog": 10, "owl": 3})
    classes = find_class_files(root, (".npy",), "npy")
    settings = SplitSettings(val_fraction=0.2, test_fraction=0.1, seed=0)
    first = assign_splits(root, classes, settings)
    counts = {
        split: {label: sum(1 for _, got in members if got == label) for label in range(3)}
        for split, members in first.items()
    }
    assert counts["val"] == {0: 4, 1: 2, 2: 1}  # 20 %, and one of a small class
    assert counts["test"] == {0: 2, 1: 1, 2: 1}
    everything = [relative for members in first.values() for relative, _ in members]
    assert sorted(everything) == sorted(sum(classes.values(), []))  # each file exactly once
    assert assign_splits(root, classes, settings) == first
    other = assign_splits(root, classes, SplitSettings(val_fraction=0.2, test_fraction=0.1, seed=1))
    assert other["val"] != first["val"]


def test_a_class_keeps_its_split_when_another_class_is_added(tmp_path: Path) -> None:
    settings = SplitSettings(seed=2, val_fraction=0.25, test_fraction=0.25)
    small = make_tree(tmp_path / "a", ".npy", {"cat": 12, "dog": 8})
    large = make_tree(tmp_path / "b", ".npy", {"ant": 6, "cat": 12, "dog": 8})

    def cats(root: Path) -> list[str]:
        result = assign_splits(root, find_class_files(root, (".npy",), "npy"), settings)
        return [relative for relative, _ in result["val"] if relative.startswith("cat/")]

    assert cats(small) == cats(large)


def test_list_files_decide_the_splits_and_test_wins_over_val(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ".wav", {"cat": 4, "dog": 4})
    (root / "validation_list.txt").write_text("# held out\ncat/item00.wav\ndog\\item01.wav\n\n")
    (root / "testing_list.txt").write_text("cat/item00.wav\ncat/item02.wav\n")
    classes = find_class_files(root, (".wav",), "audio")
    result = assign_splits(root, classes, SplitSettings())
    assert result["val"] == [("dog/item01.wav", 1)]
    assert result["test"] == [("cat/item00.wav", 0), ("cat/item02.wav", 0)]
    assert len(result["train"]) == 5
    seeded = assign_splits(root, classes, SplitSettings(split="seed"))
    assert seeded != result  # data.split=seed ignores the lists


def test_read_list_skips_comments_and_blank_lines_and_normalises_separators(
    tmp_path: Path,
) -> None:
    path = tmp_path / "list.txt"
    path.write_text("  a/b.wav \n# comment\n\nc\\d.wav\n")
    assert read_list(path) == {"a/b.wav", "c/d.wav"}


def test_one_list_file_without_the_other_is_a_user_error(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ".wav", {"cat": 3, "dog": 3})
    (root / "testing_list.txt").write_text("cat/item00.wav\n")
    with pytest.raises(UserError, match="validation_list.txt: provide both or neither"):
        folders.split_lists(root, SplitSettings())
    with pytest.raises(UserError, match="list file not found"):
        folders.split_lists(root, SplitSettings(val_list="missing.txt"))


def test_bad_fractions_and_modes_are_user_errors() -> None:
    with pytest.raises(UserError, match="sum below 1"):
        SplitSettings(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(UserError, match="data.split"):
        SplitSettings(split="random")


def test_folders_starting_with_a_dot_or_underscore_are_not_classes(tmp_path: Path) -> None:
    root = make_tree(tmp_path, ".wav", {"cat": 2, "dog": 2, "_noise": 2, ".cache": 2})
    assert list(find_class_files(root, (".wav",), "audio")) == ["cat", "dog"]


def test_every_folder_recipe_has_the_same_split_options() -> None:
    recipes = [AudioFolder(), VideoFolder(), get_recipe("npy-folder")]
    for recipe in recipes:
        for key, value in folders.FOLDER_DEFAULTS.items():
            assert recipe.defaults[key] == value, (recipe.name, key)
