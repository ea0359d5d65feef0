"""The bad-input corpus, fed to the real command line (in-process, through Typer's CliRunner).

Every mistake a user can make ends with one line ``error: ...`` naming the problem, exit code 2,
no traceback, and no run directory left behind. Every bad item inside a dataset is skipped and
counted, and training goes on. Unusual but valid audio (8/24-bit, float, a minute long) is read.

We run as root, so permissions cannot make a folder unwritable: an output folder that cannot
be written is simulated by ``--out`` pointing at a regular file, or at a path below one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bad_inputs
import pytest
import torch
from test_cli import _wide_terminal, assert_user_error, cope  # noqa: F401 (autouse fixture)

from recipes.engine import rundir

TINY_AUDIO = ["--set", "train.batch_size=4", "--set", "train.eval_batch_size=8"]
TINY_AUDIO += ["--set", "model.dim=16", "--set", "model.mlp_dim=32", "--set", "model.heads=2"]
TINY_VIDEO = ["--preset", "tiny", "--set", "data.fps=5.0", "--set", "data.frames=4"]
TINY_VIDEO += ["--set", "data.size=16", "--set", "data.progress=false"]
TINY_VIDEO += ["--set", "train.batch_size=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Finished one-step runs to damage: tiny-majority-tf with abs and nope, tiny-echo."""
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for recipe, pe in (
        ("tiny-majority-tf", "abs"),
        ("tiny-majority-tf", "nope"),
        ("tiny-echo", "abs"),
    ):
        result = cope("train", recipe, "--pe", pe, "--steps", "1", "--out", root)
        assert result.exit_code == 0, result.output
        (runs[f"{recipe}/{pe}"],) = rundir.find_runs(root, recipe, pe)
    return runs


def copy_run(trained: dict[str, Path], key: str, target: Path) -> Path:
    """A private copy of a trained run directory (each case damages its own)."""
    return Path(shutil.copytree(trained[key], target / "copy" / trained[key].name))


# --- fatal cases --------------------------------------------------------------------------------
# Each case prepares whatever it needs under tmp_path and returns the command-line arguments.
Setup = Callable[[Path, dict[str, Path]], list[str]]


@dataclass
class Fatal:
    """A user mistake: the arguments it leads to, and a fragment of the expected error line."""

    name: str
    setup: Setup
    fragment: str


def train(*args: str) -> Setup:
    """A `cope train` command with --out tmp_path/runs."""
    return lambda tmp, runs: ["train", *args, "--out", str(tmp / "runs")]


def recipe_file(text: str | bytes, *args: str) -> Setup:
    """`cope train --recipe-file FILE` with FILE holding ``text``."""

    def setup(tmp: Path, runs: dict[str, Path]) -> list[str]:
        path = tmp / "run.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", "--recipe-file", str(path), *args, "--out", str(tmp / "runs")]

    return setup


def folder_recipe(recipe: str, make: Callable[[Path], object] | None, *args: str) -> Setup:
    """`cope train RECIPE --data-dir DIR` where ``make(DIR)`` prepared DIR (None: DIR missing)."""

    def setup(tmp: Path, runs: dict[str, Path]) -> list[str]:
        data = tmp / "data"
        if make is not None:
            make(data)
        return ["train", recipe, "--steps", "1", "--data-dir", str(data), *args,
                "--out", str(tmp / "runs")]  # fmt: skip

    return setup


def only_bad_audio(root: Path) -> None:
    for label in ("low", "high"):
        for name, make in bad_inputs.AUDIO_ITEMS.items():
            make(root / label / f"{name}.wav")


def only_bad_npy(root: Path) -> None:
    for label in ("down", "up"):
        for name, make in bad_inputs.NPY_ITEMS.items():
            make(root / label / f"{name}.npy")


def only_bad_video(root: Path) -> None:
    for label in ("red", "blue"):
        bad_inputs.corrupt_video(root / label / "corrupt.mp4")
        bad_inputs.empty_video(root / label / "empty.avi")


def a_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a folder\n")


def damaged_run(key: str, damage: Callable[[Path], None], *args: str) -> Setup:
    """`cope eval RUN` of a copy of a trained run that ``damage`` changed."""

    def setup(tmp: Path, runs: dict[str, Path]) -> list[str]:
        run = copy_run(runs, key, tmp)
        damage(run)
        return ["eval", str(run), *args]

    return setup


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / name
        path.write_bytes(path.read_bytes()[:keep])

    return damage


def out_is_a_file(tmp: Path, runs: dict[str, Path]) -> list[str]:
    a_file(tmp / "runs")
    return ["train", "tiny-majority", "--steps", "1", "--out", str(tmp / "runs")]


def out_below_a_file(tmp: Path, runs: dict[str, Path]) -> list[str]:
    a_file(tmp / "blocker")
    return ["train", "tiny-majority", "--steps", "1", "--out", str(tmp / "blocker" / "runs")]


def sweep_file(text: str) -> Setup:
    """`cope sweep FILE` with FILE holding ``text``."""

    def setup(tmp: Path, runs: dict[str, Path]) -> list[str]:
        path = tmp / "sweep.toml"
        path.write_text(text)
        return ["sweep", str(path), "--out", str(tmp / "runs")]

    return setup


def folder_run_without_data(tmp: Path, runs: dict[str, Path]) -> list[str]:
    """`cope eval` of a finished npy-folder run whose data folder has since been deleted."""
    data = bad_inputs.npy_class_folder(tmp / "data")
    result = cope("train", "npy-folder", "--pe", "abs", "--steps", "1", "--data-dir", data,
                  *TINY_AUDIO, "--out", tmp / "copy")  # fmt: skip
    assert result.exit_code == 0, result.output
    shutil.rmtree(data)
    (run,) = rundir.find_runs(tmp / "copy")
    return ["eval", str(run)]


def other_checkpoint(source: str, target: str) -> Setup:
    """`cope eval` of a run of ``target`` whose best.pt was trained for ``source``."""

    def setup(tmp: Path, runs: dict[str, Path]) -> list[str]:
        run = copy_run(runs, target, tmp)
        shutil.copy(runs[source] / rundir.BEST_FILE, run / rundir.BEST_FILE)
        return ["eval", str(run)]

    return setup


FATAL = [
    # names: recipe, encoding, preset, option keys
    Fatal("unknown recipe", train("speech-comands"), "unknown recipe 'speech-comands'"),
    Fatal("unknown encoding", train("counting", "--pe", "rotary"), "unknown position encoding"),
    Fatal("unknown preset", train("counting", "--preset", "huge"), "no preset 'huge'"),
    Fatal("unknown --set key", train("counting", "--set", "model.dimm=8"), "'model.dim'"),
    Fatal("unknown --set section", train("counting", "--set", "optim.lr=1"), "optim.lr"),
    # values of the wrong type or out of range
    Fatal("text for a number", train("counting", "--set", "train.lr=fast"), "train.lr must be"),
    Fatal("text for a flag", train("counting", "--set", "model.causal=maybe"), "model.causal"),
    Fatal("zero batch size", train("counting", "--set", "train.batch_size=0"), "at least 1"),
    Fatal("negative steps", train("counting", "--set", "train.steps=-5"), "must not be negative"),
    Fatal("unknown optimiser", train("counting", "--set", "train.optimizer=sgd"), "adamw"),
    Fatal("heads not dividing dim", train("counting", "--set", "model.heads=5"), "heads"),
    Fatal("dropout above one", train("counting", "--set", "model.dropout=1.5"), "model.dropout"),
    Fatal("CoPE cap of zero", train("counting", "--set", "model.npos=0"), "model.npos"),
    Fatal("max_len below the data", train("counting", "--set", "model.max_len=8"), "model.max_len"),
    Fatal("unknown CoPE gate", train("counting", "--set", "model.cope_gate=bogus"), "cope_gate"),
    Fatal("unknown device", train("counting", "--device", "tpu"), "train.device must be"),
    *(
        []
        if torch.cuda.is_available()
        else [
            Fatal("cuda without a GPU", train("counting", "--device", "cuda"), "no CUDA GPU"),
            Fatal(
                "triton kernel without a GPU",
                train("counting", "--set", "model.cope_impl=triton"),
                "needs a CUDA GPU",
            ),
        ]
    ),
    # data options out of range
    Fatal(
        "zero sample rate",
        folder_recipe("audio-folder", bad_inputs.audio_class_folder, "--set", "data.sample_rate=0"),
        "data.sample_rate must be positive",
    ),
    Fatal(
        "zero hop",
        folder_recipe("audio-folder", bad_inputs.audio_class_folder, "--set", "data.hop_ms=0"),
        "data.hop_ms must be positive",
    ),
    Fatal(
        "zero frame stacking",
        folder_recipe("audio-folder", bad_inputs.audio_class_folder, "--set", "data.stack=0"),
        "data.stack must be at least 1",
    ),
    Fatal(
        "fractions above one",
        folder_recipe("npy-folder", bad_inputs.npy_class_folder, "--set", "data.val_fraction=1.5"),
        "data.val_fraction",
    ),
    Fatal(
        "zero video fps",
        folder_recipe(
            "video-folder", bad_inputs.video_class_folder, *TINY_VIDEO, "--set", "data.fps=0"
        ),
        "data.fps must be positive",
    ),
    Fatal(
        "empty generated split",
        train("audio-events", "--set", "data.eval_size=0"),
        "data.eval_size must be at least 1",
    ),
    Fatal(
        "empty counting split",
        train("counting", "--set", "data.eval_size=0"),
        "at least one example",
    ),
    # recipe and sweep files
    Fatal("malformed TOML", recipe_file('recipe = "counting\n'), "not valid TOML"),
    Fatal("recipe file not UTF-8", recipe_file(b'recipe = "counting"\n\xff\xfe\n'), "not UTF-8"),
    Fatal(
        "recipe file missing",
        lambda tmp, runs: ["train", "--recipe-file", str(tmp / "x.toml")],
        "file not found",
    ),
    Fatal(
        "recipe file wrong type",
        recipe_file('recipe = "counting"\n[train]\nsteps = "ten"\n'),
        "train.steps must be",
    ),
    Fatal(
        "recipe file unknown key",
        recipe_file('recipe = "counting"\n[model]\nwidth = 8\n'),
        "model.width",
    ),
    Fatal("recipe file names no recipe", recipe_file("[train]\nsteps = 3\n"), "name a recipe"),
    Fatal("sweep file malformed", sweep_file("recipes = [counting\n"), "not valid TOML"),
    Fatal(
        "sweep of an unknown recipe",
        sweep_file('recipes = ["nope"]\npes = ["abs"]\n'),
        "unknown recipe 'nope'",
    ),
    Fatal(
        "sweep of an unknown encoding",
        sweep_file('recipes = ["counting"]\npes = ["ropey"]\n'),
        "unknown position encoding 'ropey'",
    ),
    # data folders
    Fatal("no --data-dir", train("audio-folder", "--steps", "1"), "--data-dir"),
    Fatal("missing audio folder", folder_recipe("audio-folder", None), "not found"),
    Fatal("empty audio folder", folder_recipe("audio-folder", Path.mkdir), "no class sub-folders"),
    Fatal(
        "audio data-dir is a file", folder_recipe("audio-folder", a_file), "data folder not found"
    ),
    Fatal(
        "only unreadable audio",
        folder_recipe("audio-folder", only_bad_audio),
        "files are unreadable",
    ),
    Fatal("missing npy folder", folder_recipe("npy-folder", None), "does not exist"),
    Fatal("empty npy folder", folder_recipe("npy-folder", Path.mkdir), "no class sub-folders"),
    Fatal("only bad arrays", folder_recipe("npy-folder", only_bad_npy), "usable (time, features)"),
    Fatal("npy data-dir is a file", folder_recipe("npy-folder", a_file), "is not a folder"),
    Fatal("video data-dir is a file", folder_recipe("video-folder", a_file), "does not exist"),
    Fatal("missing video folder", folder_recipe("video-folder", None), "does not exist"),
    Fatal("empty video folder", folder_recipe("video-folder", Path.mkdir), "no class sub-folders"),
    Fatal(
        "only broken videos",
        folder_recipe("video-folder", only_bad_video, *TINY_VIDEO),
        "files are unreadable",
    ),
    Fatal(
        "speech commands not downloaded", folder_recipe("speech-commands", Path.mkdir), "--download"
    ),
    # checkpoints
    Fatal(
        "checkpoint of another encoding",
        other_checkpoint("tiny-majority-tf/nope", "tiny-majority-tf/abs"),
        "does not fit this model",
    ),
    Fatal(
        "checkpoint of another recipe",
        other_checkpoint("tiny-echo/abs", "tiny-majority-tf/abs"),
        "belongs to recipe 'tiny-echo'",
    ),
    Fatal(
        "truncated checkpoint",
        damaged_run("tiny-majority-tf/abs", truncate("best.pt", 200)),
        "damaged or unreadable",
    ),
    Fatal(
        "zero-byte checkpoint",
        damaged_run("tiny-majority-tf/abs", truncate("best.pt", 0)),
        "damaged or unreadable",
    ),
    Fatal(
        "damaged run config",
        damaged_run("tiny-majority-tf/abs", truncate("config.json", 9)),
        "config.json",
    ),
    Fatal("data folder of a run deleted", folder_run_without_data, "does not exist"),
    # output folder that cannot be written (simulated: we run as root)
    Fatal("--out is a regular file", out_is_a_file, "cannot create run directories"),
    Fatal("--out below a regular file", out_below_a_file, "choose another --out"),
]


@pytest.mark.parametrize("case", FATAL, ids=[case.name for case in FATAL])
def test_user_mistake_ends_with_one_error_line_and_no_run_directory(
    case: Fatal, trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/, data/) land in the test's folder
    arguments = case.setup(tmp_path, trained)
    result = cope(*arguments)
    assert_user_error(result, case.fragment)
    made = [path for path in tmp_path.rglob("seed*-*") if "copy" not in path.parts]
    assert made == []  # no half-made run directory anywhere below the test folder


# --- bad items inside a dataset: skipped, counted, training goes on -----------------------------
@dataclass
class BadItem:
    """A bad file placed among good ones: which recipe reads it and how to build the folder."""

    name: str
    recipe: str
    make_good: Callable[[Path], Path]
    make_bad: Callable[[Path], Path]
    suffix: str
    options: list[str]


BAD_ITEMS = [
    *(BadItem(f"audio {name}", "audio-folder", bad_inputs.audio_class_folder, make, ".wav",
              TINY_AUDIO) for name, make in bad_inputs.AUDIO_ITEMS.items()),
    *(BadItem(f"array {name}", "npy-folder", bad_inputs.npy_class_folder, make, ".npy",
              TINY_AUDIO) for name, make in bad_inputs.NPY_ITEMS.items()),
    *(BadItem(f"video {name}", "video-folder", bad_inputs.video_class_folder, make,
              ".avi" if name == "empty" else ".mp4", TINY_VIDEO)
      for name, make in bad_inputs.VIDEO_ITEMS.items()),
]  # fmt: skip


def data_record(out: Path) -> dict:
    """The ``kind: data`` record of the only run under ``out``."""
    (run,) = rundir.find_runs(out)
    records = [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines()]
    return next(record for record in records if record.get("kind") == "data")


@pytest.mark.parametrize("case", BAD_ITEMS, ids=[case.name for case in BAD_ITEMS])
def test_bad_item_is_skipped_counted_and_training_goes_on(case: BadItem, tmp_path: Path) -> None:
    data = case.make_good(tmp_path / "data")
    first_class = sorted(path for path in data.iterdir() if path.is_dir())[0]
    case.make_bad(first_class / f"bad{case.suffix}")
    out = tmp_path / "runs"
    arguments = ["train", case.recipe, "--pe", "rope", "--steps", "1", "--data-dir", str(data)]
    result = cope(*arguments, *case.options, "--out", out)
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable" in result.output and "Traceback" not in result.output
    assert data_record(out)["skipped"] == 1


# --- unusual but valid audio: read, not skipped ---------------------------------------------------
@pytest.mark.parametrize("kind", list(bad_inputs.VALID_AUDIO_ITEMS))
def test_valid_audio_formats_and_a_minute_long_clip_load_and_train(
    kind: str, tmp_path: Path
) -> None:
    data = bad_inputs.audio_class_folder(tmp_path / "data", per_class=5)
    for label in ("low", "high"):
        bad_inputs.VALID_AUDIO_ITEMS[kind](data / label / f"odd-{kind}.wav")
    out = tmp_path / "runs"
    arguments = ["train", "audio-folder", "--pe", "rope", "--steps", "1", "--data-dir", str(data)]
    result = cope(*arguments, *TINY_AUDIO, "--set", "data.max_seconds=2.0", "--out", out)
    assert result.exit_code == 0, result.output
    assert "skipped" not in result.output
    record = data_record(out)
    assert record["skipped"] == 0
    assert record["train_size"] + sum(record["splits"].values()) == 12


def test_a_minute_long_clip_is_cropped_to_max_seconds(tmp_path: Path) -> None:
    from recipes.base import get_recipe

    recipe = get_recipe("audio-folder")
    data = bad_inputs.audio_class_folder(tmp_path / "data", per_class=5)
    bad_inputs.very_long_wav(data / "low" / "long.wav")
    config = {**recipe.defaults, "data.seed": 0, "model.pe": "rope", "data.max_seconds": 2.0}
    bundle = recipe.build_data(config, data, False)
    datasets = [bundle.train, *(split.dataset for split in bundle.splits.values())]
    frames = [
        dataset[index]["inputs"].shape[0] for dataset in datasets for index in range(len(dataset))
    ]
    assert max(frames) == 201  # 2 s at a 10 ms hop (+1 centred frame), not 6001


# --- options Click itself rejects (before any cope code runs) -----------------------------------
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "counting", "--steps", "0"], "Invalid value for '--steps'"),
        (["train", "counting", "--steps", "many"], "Invalid value for '--steps'"),
        (["train", "counting", "--stepz", "3"], "No such option: --stepz"),
        (["compare", "counting", "--seeds", "0"], "Invalid value for '--seeds'"),
        (["positions", "somewhere", "--example", "x"], "Invalid value for '--example'"),
    ],
    ids=["steps zero", "steps text", "misspelt option", "zero seeds", "example text"],
)
def test_option_parse_errors_exit_2_with_the_option_named_and_no_traceback(
    args: list[str], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Typer's own usage errors are a boxed message (not an `error:` line), still one sentence."""
    monkeypatch.chdir(tmp_path)
    result = cope(*args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert fragment in " ".join(result.output.replace("│", " ").split()), result.output
    assert not (tmp_path / "runs").exists()


# --- the real speech recipe: bad clips skipped, odd formats read, long clips cropped -------------
def test_speech_commands_skips_bad_clips_and_reads_odd_formats(tmp_path: Path) -> None:
    from audio_fixtures import speech_commands_tree

    data_dir = tmp_path / "data"
    tree = speech_commands_tree(
        data_dir / "speech_commands_v0.02", words=("yes", "no", "cat"), per_word=(3, 1, 1)
    )
    items = {**bad_inputs.AUDIO_ITEMS, **bad_inputs.VALID_AUDIO_ITEMS}
    for name, make in items.items():  # training clips: in neither list file
        make(tree.root / "yes" / f"odd{name.replace('-', '')}_nohash_0.wav")
    out = tmp_path / "runs"
    arguments = ["train", "speech-commands", "--pe", "rope", "--steps", "1", "--data-dir", data_dir]
    result = cope(*arguments, *TINY_AUDIO, "--set", "data.protocol=35", "--out", out)
    assert result.exit_code == 0, result.output
    skipped = len(bad_inputs.AUDIO_ITEMS)
    assert f"skipped {skipped} unreadable" in result.output and "Traceback" not in result.output
    record = data_record(out)
    assert record["skipped"] == skipped
    assert record["train_size"] == 3 * 3 + len(bad_inputs.VALID_AUDIO_ITEMS)


@pytest.mark.slow  # a fresh interpreter imports torch: ~15 s on the shared CPUs
def test_a_real_process_prints_only_the_error_line_on_stderr(tmp_path: Path) -> None:
    """Outside CliRunner too: the installed entry point, stdout empty, stderr one line, exit 2."""
    import os
    import subprocess
    import sys

    from test_cli import LAUNCHER

    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    (tmp_path / "runs").write_text("a file where the runs folder should be\n")
    command = [sys.executable, str(script), str(Path(__file__).parent), "train", "tiny-majority",
               "--steps", "1", "--out", str(tmp_path / "runs")]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: cannot create run directories under")
