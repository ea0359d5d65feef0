"""Folder datasets: class sub-folders of files, split list files and one stratified split.

``audio-folder``, ``video-folder`` and ``npy-folder`` read the same layout::

    ROOT/<class>/**/<file>          one sub-folder per class (names starting "." or "_", such
                                    as caches and ``_background_noise_``, are not classes)
    ROOT/validation_list.txt        optional, Speech Commands style: one path relative to ROOT
    ROOT/testing_list.txt           per line (blank lines and "#" comments ignored)

and split it here, so that the same files with the same options fall into the same splits in
all three: a comparison across feature pipelines then compares like with like. What stays in a
recipe is what is particular to it: how a file is read, cached and turned into model inputs.

Splits (``data.split``): ``lists`` uses the list files (``data.val_list`` / ``data.test_list``,
or the two default names); ``seed`` shuffles each class with ``data.seed`` and cuts
``data.val_fraction`` and ``data.test_fraction`` of it (stratified, the same for every model
seed); ``auto`` uses the default list files when both exist, else the seed. Files that later
turn out unreadable are dropped from the split they were assigned to, so a bad file never moves
another one between splits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from recipes.base import Config, UserError
from recipes.settings import defaults_of, settings_of

DEFAULT_LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}
SPLITS = ("train", "val", "test")
SPLIT_MODES = ("auto", "seed", "lists")

# split name -> (path relative to ROOT, class id) in listing order
Assignment = dict[str, list[tuple[str, int]]]


@dataclass(frozen=True)
class SplitSettings:
    """How a folder is split (the ``data.*`` keys below; the seed is ``data.seed``)."""

    split: str = "auto"  # auto | seed | lists
    val_list: str = ""  # list file names relative to ROOT; "" = the default name
    test_list: str = ""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLIT_MODES:
            raise UserError(
                f"data.split must be one of {', '.join(SPLIT_MODES)}, not {self.split!r}"
            )
        val, test = self.val_fraction, self.test_fraction
        if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
            raise UserError(
                "data.val_fraction and data.test_fraction must lie in [0, 1) and sum below 1"
            )

    @classmethod
    def from_config(cls, config: Config) -> SplitSettings:
        return settings_of(cls, config)


# The recipe defaults of every folder recipe (data.seed is an engine default).
FOLDER_DEFAULTS: Config = {
    key: value for key, value in defaults_of(SplitSettings).items() if key != "data.seed"
}


def folder_root(data_dir: Path | None, recipe: str, what: str) -> Path:
    """The data folder of a folder recipe; a UserError when it is not given or not a folder."""
    if data_dir is None:
        raise UserError(
            f"{recipe} reads a folder: pass --data-dir DIR holding one sub-folder of {what} "
            "files per class"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder not found: {root} does not exist or is not a folder")
    return root


def list_class_files(root: Path, suffixes: tuple[str, ...]) -> dict[str, list[str]]:
    """Paths relative to ``root`` (sorted, "/"-separated) of the files with these suffixes in
    each class sub-folder, by class name (sorted); a class folder without any maps to []."""
    classes: dict[str, list[str]] = {}
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        if folder.name.startswith((".", "_")):
            continue
        classes[folder.name] = [
            path.relative_to(root).as_posix()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.suffix.lower() in suffixes
        ]
    return classes


def find_class_files(root: Path, suffixes: tuple[str, ...], what: str) -> dict[str, list[str]]:
    """:func:`list_class_files`, checked: at least two classes, none of them empty."""
    classes = list_class_files(root, suffixes)
    kinds = ", ".join(suffix.lstrip(".") for suffix in suffixes)
    if not any(classes.values()):
        raise UserError(f"{root} has no class sub-folders holding {what} files ({kinds})")
    for name, files in classes.items():
        if not files:
            raise UserError(f"class folder {root / name} holds no {what} files ({kinds})")
    if len(classes) < 2:
        raise UserError(f"{root} holds one class ({next(iter(classes))}); at least two are needed")
    return classes


def read_list(path: Path) -> set[str]:
    """The relative paths a split list names, one per line ("#" comments and blanks skipped)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.strip().replace("\\", "/")
        if line and not line.startswith("#"):
            names.add(Path(line).as_posix())
    return names


def split_lists(root: Path, settings: SplitSettings) -> dict[str, set[str]] | None:
    """The val and test lists to split by, or None to split by seed."""
    if settings.split == "seed":
        return None
    named = {"val": settings.val_list, "test": settings.test_list}
    if any(named.values()):  # explicit names: each must exist; an empty name lists nothing
        paths = {split: root / name for split, name in named.items() if name}
    else:
        paths = {split: root / name for split, name in DEFAULT_LISTS.items()}
        present = [path for path in paths.values() if path.is_file()]
        if settings.split == "auto" and not present:
            return None
        if settings.split == "auto" and len(present) == 1:
            missing = next(path for path in paths.values() if not path.is_file())
            raise UserError(
                f"{root} has {present[0].name} but no {missing.name}: provide both or neither"
            )
    for path in paths.values():
        if not path.is_file():
            raise UserError(f"list file not found: {path}")
    return {split: read_list(paths[split]) if split in paths else set() for split in named}


def stratified_split(
    name: str, files: list[str], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """One class's files cut into train/val/test after a shuffle fixed by (seed, class name).

    Seeding per class keeps a class's split unchanged when other classes come or go. A class of
    three or more files lends at least one to each held-out split whose fraction is not 0.
    """
    shuffled = sorted(files)
    random.Random(f"{seed}:{name}").shuffle(shuffled)
    count = len(shuffled)

    def share(fraction: float) -> int:
        wanted = round(count * fraction)
        return max(wanted, 1) if fraction > 0 and count >= 3 else wanted

    val, test = share(val_fraction), share(test_fraction)
    return {
        "train": shuffled[val + test :],
        "val": shuffled[:val],
        "test": shuffled[val : val + test],
    }


def assign_splits(root: Path, classes: dict[str, list[str]], settings: SplitSettings) -> Assignment:
    """(relative path, class id) of every file per split; class ids follow the sorted names."""
    lists = split_lists(root, settings)
    assignment: Assignment = {split: [] for split in SPLITS}
    for label, (name, files) in enumerate(classes.items()):
        if lists is None:
            parts = stratified_split(
                name, files, settings.seed, settings.val_fraction, settings.test_fraction
            )
            chosen = {split: set(members) for split, members in parts.items()}
        else:
            chosen = {"test": lists["test"], "val": lists["val"] - lists["test"]}
        for relative in files:
            split = next((s for s in ("val", "test") if relative in chosen[s]), "train")
            assignment[split].append((relative, label))
    return assignment


def check_splits_not_empty(root: Path, sizes: dict[str, int], unreadable: dict[str, int]) -> None:
    """A UserError naming the first empty split (and whether its files were all unreadable)."""
    for split in SPLITS:
        if sizes.get(split, 0) == 0:
            bad = unreadable.get(split, 0)
            why = f" (all {bad} of its files are unreadable)" if bad else ""
            raise UserError(
                f"the {split} split of {root} is empty{why}; add files, or change "
                "data.val_fraction / data.test_fraction or the list files"
            )
