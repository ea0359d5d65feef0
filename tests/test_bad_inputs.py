"""The bad-input corpus, fed to the real command line (in-process, through Typer's CliRunner).

Every mistake a user can make ends with one line ``error: ...`` naming the problem, exit code 2,
no traceback, and no run directory left behind. Every bad item inside a dataset is skipped and
counted, and training goes on. Unusual but valid audio (8/24-bit, float, a minute long) is read.

We run as root, so permissions cannot make a folder unwritable: an output folder that cannot
be written is simulated by ``--out`` pointing at a regular file, or at a path below one, and a
folder that turns read-only (or a disk that fills up) mid-run is a small tmpfs we mount,
remount read-only or fill (skipped where mounting is not allowed; an injected ENOSPC runs
everywhere). Files cope wrote itself and trusts (checkpoints, caches) are damaged on purpose:
cut short, a bit flipped, 64 bytes zeroed, a wrong digest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
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


def damage_file(name: str, damage: Callable[[Path], Path]) -> Callable[[Path], None]:
    return lambda run: damage(run / name) and None


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
    Fatal(
        "rise gate on text",
        train("counting", "--pe", "cope", "--cope-gate", "rise"),
        "text tokens have none",
    ),
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
    *(
        Fatal(
            f"best.pt: {name}",
            damaged_run("tiny-majority-tf/abs", damage_file(rundir.BEST_FILE, damage)),
            "best.pt is damaged or unreadable",
        )
        for name, damage in bad_inputs.DAMAGED_FILES.items()
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


# --- files cope wrote and trusts: damaged checkpoints and caches ---------------------------------
STEPPED = ["tiny-majority", "--pe", "abs", "--set", "train.checkpoint_every=5"]  # 30 steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The finished run every interrupted, damaged or faulted run must equal bit for bit."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = cope("train", *STEPPED, "--out", out)
    assert result.exit_code == 0, result.output
    (run,) = rundir.find_runs(out)
    return run


@pytest.fixture(scope="module")
def stopped_at_12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``--out`` of a run stopped at step 12: checkpoint.pt (step 12), checkpoint.prev.pt (10)."""
    out = tmp_path_factory.mktemp("stopped")
    result = cope("train", *STEPPED, "--stop-after", "12", "--out", out)
    assert result.exit_code == 0 and "stopped at step 12" in result.output, result.output
    return out


def assert_same_run(run: Path, expected: Path) -> None:
    """Finished, with bit-identical final and best weights and the same final evaluation."""
    from recipes.engine.checkpoint import load_checkpoint

    assert rundir.is_finished(run)
    for name in (rundir.CHECKPOINT_FILE, rundir.BEST_FILE):
        got, want = load_checkpoint(run / name)["model"], load_checkpoint(expected / name)["model"]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want), name
    read = rundir.read_json
    assert read(run / rundir.EVAL_FILE)["splits"] == read(expected / rundir.EVAL_FILE)["splits"]


def stray_temporary_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".tmp" in path.name or ".partial" in path.name]


@pytest.mark.parametrize("damage", list(bad_inputs.DAMAGED_FILES))
def test_damaged_latest_checkpoint_resumes_from_the_previous_one_bit_exactly(
    damage: str, stopped_at_12: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(stopped_at_12, tmp_path / "runs"))
    (run,) = rundir.find_runs(out)
    bad_inputs.DAMAGED_FILES[damage](run / rundir.CHECKPOINT_FILE)
    result = cope("train", *STEPPED, "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"{run / rundir.CHECKPOINT_FILE} is damaged or unreadable" in said
    assert "resuming from the previous checkpoint checkpoint.prev.pt (step 10)" in said
    assert "Traceback" not in result.output
    assert (run / "checkpoint.pt.damaged").is_file()
    assert_same_run(run, uninterrupted)


@pytest.mark.parametrize("damage", list(bad_inputs.DAMAGED_FILES))
def test_damaged_checkpoint_with_no_verified_one_left_stops_and_changes_nothing(
    damage: str, stopped_at_12: Path, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(stopped_at_12, tmp_path / "runs"))
    (run,) = rundir.find_runs(out)
    bad_inputs.DAMAGED_FILES[damage](run / rundir.CHECKPOINT_FILE)
    bad_inputs.flip_bit(run / rundir.PREVIOUS_CHECKPOINT_FILE)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = cope("train", *STEPPED, "--resume", "--out", out)
    assert_user_error(result, "is damaged or unreadable")
    assert "nothing was changed" in result.output
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_resume_removes_temporary_files_a_killed_run_left(
    stopped_at_12: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(stopped_at_12, tmp_path / "runs"))
    (run,) = rundir.find_runs(out)
    killed = subprocess.Popen(["true"])
    killed.wait()  # its process id no longer runs
    torn = run / f".checkpoint.pt.tmp-{killed.pid}"
    torn.write_bytes(b"half a checkpoint")
    result = cope("train", *STEPPED, "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    assert stray_temporary_files(out) == []
    assert_same_run(run, uninterrupted)


def test_damaged_feature_cache_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    data = bad_inputs.audio_class_folder(tmp_path / "data")
    arguments = ["train", "audio-folder", "--pe", "rope", "--steps", "2", "--data-dir", data]
    arguments += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    first = cope(*arguments, *TINY_AUDIO, "--out", tmp_path / "first")
    assert first.exit_code == 0, first.output
    (cache,) = (tmp_path / "cache").glob("*/features-*.pt")
    bad_inputs.flip_bit(cache)
    from recipes import _audio

    _audio._MEMORY_CACHE.clear()  # a new process would not have it in memory
    second = cope(*arguments, *TINY_AUDIO, "--out", tmp_path / "second")
    assert second.exit_code == 0, second.output
    said = " ".join(second.output.split())
    assert f"note: {cache} is damaged or unreadable" in said and "rebuilding it" in said
    (one,), (two,) = rundir.find_runs(tmp_path / "first"), rundir.find_runs(tmp_path / "second")
    assert_same_run(two, one)
    assert stray_temporary_files(data) == []


def test_damaged_clip_in_the_video_cache_is_decoded_again(tmp_path: Path) -> None:
    data = bad_inputs.video_class_folder(tmp_path / "data")
    arguments = ["train", "video-folder", "--pe", "rope", "--steps", "1", "--data-dir", data]
    first = cope(*arguments, *TINY_VIDEO, "--out", tmp_path / "first")
    assert first.exit_code == 0, first.output
    clip = sorted((data / ".cope-cache").rglob("*.pt"))[0]
    bad_inputs.flip_bit(clip)
    second = cope(*arguments, *TINY_VIDEO, "--out", tmp_path / "second")
    assert second.exit_code == 0, second.output
    said = " ".join(second.output.split())
    assert f"note: {clip} is damaged or unreadable" in said and "decoding" in said
    (one,), (two,) = rundir.find_runs(tmp_path / "first"), rundir.find_runs(tmp_path / "second")
    assert_same_run(two, one)


# --- storage faults in the middle of a run: full disk, read-only, folder deleted ----------------
# A fault is set off from the progress observer after step 7; the next write (metrics at step
# 10, best.pt, checkpoint.pt) meets it. Real faults need a file system of our own: a small tmpfs,
# which needs root and a kernel that lets us mount (skipped with the reason where it does not).


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at tmp_path/disk: a real file system that fills up or turns ro."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fault_after_step(monkeypatch: pytest.MonkeyPatch, step: int, fault: Callable[[], None]):
    """Set off ``fault`` once, right after training step ``step`` of the next `cope train`."""
    from cope_cli import render
    from cope_cli.render import RichObserver

    class Faulting(RichObserver):
        def train_step(self, at: int, loss: float | None, lr: float) -> None:
            super().train_step(at, loss, lr)
            if at == step:
                fault()

    monkeypatch.setattr(render, "RichObserver", Faulting)  # the commands import it when run


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with a ballast file until only ``leave`` bytes are free."""
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with ballast.open("wb") as stream:
        stream.write(bytes(max(0, free - leave)))
    return ballast


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


def arm_injected_full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Fault injection where no tmpfs can be mounted: every later write fails with ENOSPC."""
    from recipes import files

    def arm() -> None:
        def full(self, data: bytes) -> int:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error

        monkeypatch.setattr(files._KeepingWriteErrors, "write", full)

    return arm


def test_full_disk_mid_run_is_one_error_line_and_resume_is_bit_exact_injected(
    uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "runs"
    fault_after_step(monkeypatch, 7, arm_injected_full_disk(monkeypatch))
    result = cope("train", *STEPPED, "--out", out)
    assert_user_error(result, "best.pt (no space left on device, ")
    assert "free there" in result.output
    monkeypatch.undo()
    (run,) = rundir.find_runs(out)
    assert stray_temporary_files(out) == []
    resumed = cope("train", *STEPPED, "--resume", "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(run, uninterrupted)


@pytest.mark.parametrize(
    ("leave", "fails"),
    [(0, "best.pt"), (8192, "checkpoint.pt")],
    ids=["no byte free", "8 KiB free"],
)
def test_full_tmpfs_mid_run_is_one_error_line_and_resume_is_bit_exact_once_freed(
    leave: int,
    fails: str,
    small_disk: Path,
    uninterrupted: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recipes.engine.checkpoint import load_checkpoint

    out = small_disk / "runs"
    fault_after_step(monkeypatch, 7, lambda: fill(small_disk, leave))
    result = cope("train", *STEPPED, "--out", out)
    assert_user_error(result, f"{fails} (no space left on device, ")
    assert "free there" in result.output
    (run,) = rundir.find_runs(out)
    assert stray_temporary_files(small_disk) == []
    assert load_checkpoint(run / rundir.CHECKPOINT_FILE)["progress"]["step"] == 5  # intact
    (small_disk / "ballast").unlink()
    monkeypatch.undo()
    resumed = cope("train", *STEPPED, "--resume", "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(run, uninterrupted)


def test_output_folder_turned_read_only_mid_run_is_one_error_line_and_resumable(
    small_disk: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = small_disk / "runs"
    fault_after_step(monkeypatch, 7, lambda: remount(small_disk, "ro"))
    result = cope("train", *STEPPED, "--out", out)
    assert_user_error(result, "(the file system is read-only)")
    remount(small_disk, "rw")
    monkeypatch.undo()
    (run,) = rundir.find_runs(out)
    assert stray_temporary_files(small_disk) == []
    resumed = cope("train", *STEPPED, "--resume", "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(run, uninterrupted)


def test_run_folder_deleted_mid_run_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "runs"
    fault_after_step(monkeypatch, 7, lambda: shutil.rmtree(out))
    result = cope("train", *STEPPED, "--out", out)
    assert_user_error(result, "no longer exists")
    assert not out.exists()


@pytest.mark.slow  # a fresh interpreter imports torch: ~15 s on the shared CPUs
def test_a_real_process_on_a_full_disk_prints_one_line_and_resumes_bit_exactly(
    small_disk: Path, uninterrupted: Path
) -> None:
    """The installed entry point on a 48 KiB tmpfs: the step-0 checkpoint fits, later ones not."""
    import sys

    from test_cli import LAUNCHER

    remount(small_disk, "size=48k")
    script = small_disk.parent / "launch.py"
    script.write_text(LAUNCHER)
    out = small_disk / "runs"
    command = [sys.executable, str(script), str(Path(__file__).parent), "train", *STEPPED,
               "--out", str(out)]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), result.stderr
    assert "(no space left on device, " in lines[0]
    assert stray_temporary_files(small_disk) == []
    remount(small_disk, "size=1m")  # space freed
    resumed = cope("train", *STEPPED, "--resume", "--out", out)
    assert resumed.exit_code == 0, resumed.output
    (run,) = rundir.find_runs(out)
    assert_same_run(run, uninterrupted)
