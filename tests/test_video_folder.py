"""Specifications of the `video-folder` recipe on videos the tests write with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from video_fixtures import coloured_frames, write_video

import recipes._video as video
from recipes._video import DecodeSettings, decode_video, pick_frames
from recipes.base import UserError, get_recipe, pad_collate
from recipes.video_folder import VideoFolder

# (codec, suffix, pixel format): two containers and codecs per class, plus VP9 and H.264
FORMATS = [
    ("mpeg4", "mp4", "yuv420p"),
    ("mjpeg", "avi", "yuvj420p"),
    ("libvpx-vp9", "webm", "yuv420p"),
    ("h264", "mkv", "yuv420p"),
]
FAST = {"data.fps": 5.0, "data.frames": 6, "data.size": 16, "data.progress": False}


def make_folder(root: Path, per_class: int = 4) -> Path:
    """red/ and blue/ class folders with ``per_class`` videos each, in rotating formats,
    plus one corrupt and one empty file that the recipe must skip."""
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        for index in range(per_class):
            codec, suffix, pixels = FORMATS[index % len(FORMATS)]
            frames = coloured_frames(12 + 2 * index, colour)
            write_video(
                root / label / f"clip{index}.{suffix}", frames, codec=codec, pixel_format=pixels
            )
    rng = np.random.default_rng(0)
    (root / "red" / "corrupt.mp4").write_bytes(rng.integers(0, 256, 4000, np.uint8).tobytes())
    (root / "blue" / "empty.avi").write_bytes(b"")
    (root / "blue" / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("videos"))


def test_recipe_is_registered_as_a_folder_recipe() -> None:
    recipe = get_recipe("video-folder")
    assert recipe.modality == "video" and recipe.data_source == "folder"


def test_corrupt_and_empty_files_are_skipped_and_counted(folder: Path, tmp_path: Path) -> None:
    bundle = VideoFolder().build_data({**FAST, "data.cache_dir": str(tmp_path)}, folder, False)
    assert bundle.skipped == 2
    sizes = [len(bundle.train)] + [len(split.dataset) for split in bundle.splits.values()]
    assert sum(sizes) == 8  # the two unreadable files are gone, the .txt was never a video
    assert bundle.info["class_names"] == ["blue", "red"] and bundle.info["num_classes"] == 2


def test_every_container_decodes_to_the_colour_it_was_written_with(folder: Path) -> None:
    settings = DecodeSettings(fps=5.0, frames=4, size=16)
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        for index, (codec, suffix, _) in enumerate(FORMATS):
            clip = decode_video(folder / label / f"clip{index}.{suffix}", settings)
            assert clip.shape == (4, 3, 16, 16) and clip.dtype == torch.uint8
            corner = clip[:, :, 0, 0].float().mean(dim=0)  # the background, away from the square
            assert torch.allclose(corner, torch.tensor(colour, dtype=torch.float), atol=12), codec


def test_a_batch_of_decoded_videos_runs_through_the_model(folder: Path, tmp_path: Path) -> None:
    recipe = VideoFolder()
    options = {**FAST, "data.cache_dir": str(tmp_path), **recipe.presets["tiny"]}
    bundle = recipe.build_data(options, folder, False)
    items = [bundle.train[index] for index in range(len(bundle.train))]
    batch = pad_collate(items)
    assert batch["inputs"].shape[1:] == (6, 3, 16, 16)
    assert batch["inputs"].dtype == torch.float32 and batch["inputs"].abs().max() <= 1.0
    model = recipe.build_model(options, bundle.info)
    logits = model(batch["inputs"], batch.get("padding_mask"))
    assert logits.shape == (len(items), 2) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, batch["targets"]).backward()


def test_frames_are_sampled_by_time_not_by_index(tmp_path: Path) -> None:
    """A 10 fps and a 20 fps video of the same ramp give the same frames at 5 fps."""
    for fps in (10, 20):
        seconds = np.arange(2 * fps) / fps
        levels = (seconds * 100).astype(np.uint8)  # grey level = 100 x time in seconds
        frames = np.repeat(levels[:, None, None, None], 16, axis=1).repeat(16, 2).repeat(3, 3)
        path = write_video(
            tmp_path / f"ramp{fps}.avi", frames, codec="mjpeg", fps=fps, pixel_format="yuvj420p"
        )
        clip = decode_video(path, DecodeSettings(fps=5.0, frames=6, size=16, channels=1))
        measured = clip[:, 0].float().mean(dim=(1, 2))
        expected = torch.tensor([0.0, 20, 40, 60, 80, 100])
        assert torch.allclose(measured, expected, atol=4), (fps, measured)


def test_short_videos_give_shorter_clips_that_are_masked_in_a_batch(tmp_path: Path) -> None:
    short = write_video(
        tmp_path / "short.mp4", coloured_frames(10, (90, 90, 90)), codec="mpeg4", fps=10
    )
    clip = decode_video(short, DecodeSettings(fps=5.0, frames=12, size=16))
    assert clip.shape[0] == 5  # one second at 5 fps, not the 12 asked for
    longer = torch.zeros(12, 3, 16, 16)
    batch = pad_collate([{"inputs": clip.float(), "targets": 0}, {"inputs": longer, "targets": 1}])
    assert batch["padding_mask"][0].tolist() == [False] * 5 + [True] * 7


def test_pick_frames_takes_the_frame_on_screen_at_each_time() -> None:
    times = [0.0, 0.1, 0.2, 0.3]
    assert pick_frames(times, [0.0, 0.05, 0.1, 0.25, 0.35, 0.4, 0.5]) == [0, 0, 1, 2, 3]
    assert pick_frames([0.0], [0.0, 0.5]) == [0]
    assert pick_frames([], [0.0]) == []


def test_decoded_clips_are_cached_and_keyed_by_settings(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {**FAST, "data.cache_dir": str(tmp_path)}
    first = VideoFolder().build_data(options, folder, False)
    [cache] = list(tmp_path.iterdir())
    assert len(list(cache.glob("*.pt"))) == 8 and len(list(cache.glob("*.err"))) == 2

    def refuse(*args, **kwargs):
        raise AssertionError("a cached video was decoded again")

    monkeypatch.setattr(video, "decode_video", refuse)
    again = VideoFolder().build_data(options, folder, False)
    assert again.skipped == 2
    assert torch.equal(first.train[0]["inputs"], again.train[0]["inputs"])
    with pytest.raises(AssertionError, match="decoded again"):
        VideoFolder().build_data({**options, "data.size": 8}, folder, False)


def test_list_files_decide_the_splits(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "videos", per_class=3)
    (root / "validation_list.txt").write_text("red/clip0.mp4\nblue/clip1.avi\n")
    (root / "testing_list.txt").write_text("# held out\nblue/clip2.webm\n")
    bundle = VideoFolder().build_data({**FAST, "data.cache": False}, root, False)
    assert len(bundle.splits["val"].dataset) == 2 and len(bundle.splits["test"].dataset) == 1
    assert sorted(bundle.splits["val"].dataset.labels) == [0, 1]
    assert len(bundle.train) == 3 and bundle.skipped == 2


def test_splits_are_the_shared_folder_split_less_unreadable_files(
    folder: Path, tmp_path: Path
) -> None:
    from recipes import folders
    from recipes._video import VIDEO_SUFFIXES

    options = {**FAST, "data.cache_dir": str(tmp_path)}
    options.update({"data.val_fraction": 0.25, "data.test_fraction": 0.25, "data.seed": 0})
    bundle = VideoFolder().build_data(options, folder, False)
    classes = folders.find_class_files(folder, VIDEO_SUFFIXES, "video")
    expected = folders.assign_splits(folder, classes, folders.SplitSettings.from_config(options))
    unreadable = {"red/corrupt.mp4", "blue/empty.avi"}
    for split in ("val", "test"):
        labels = [label for relative, label in expected[split] if relative not in unreadable]
        assert bundle.splits[split].dataset.labels == labels


def test_missing_or_empty_folders_are_user_errors(tmp_path: Path) -> None:
    recipe = VideoFolder()
    with pytest.raises(UserError, match="--data-dir"):
        recipe.build_data(FAST, None, False)
    with pytest.raises(UserError, match="does not exist"):
        recipe.build_data(FAST, tmp_path / "nowhere", False)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("no videos here")
    with pytest.raises(UserError, match="no class sub-folders holding video files"):
        recipe.build_data(FAST, tmp_path, False)
    (tmp_path / "cats" / "bad.mp4").write_bytes(b"")
    with pytest.raises(UserError, match="at least two"):
        recipe.build_data(FAST, tmp_path, False)
    (tmp_path / "dogs").mkdir()
    for index in range(3):
        (tmp_path / "dogs" / f"bad{index}.mkv").write_bytes(b"junk")
    with pytest.raises(UserError, match="files are unreadable"):
        recipe.build_data({**FAST, "data.cache": False}, tmp_path, False)


def test_cli_trains_a_few_steps_on_a_video_folder(folder: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cope_cli.app import app

    arguments = ["train", "video-folder", "--pe", "rope", "--steps", "3", "--preset", "tiny"]
    arguments += ["--data-dir", str(folder), "--out", str(tmp_path / "runs")]
    options = [f"{key}={value}" for key, value in FAST.items() if key != "data.progress"]
    options += [f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=4"]
    for option in options:
        arguments += ["--set", option]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "skipped 2" in result.output
    assert list((tmp_path / "runs" / "video-folder" / "rope").glob("*/eval.json"))


def test_cli_reports_a_missing_folder_in_one_sentence(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cope_cli.app import app

    arguments = ["train", "video-folder", "--steps", "1", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*arguments, "--data-dir", str(tmp_path / "none")])
    assert result.exit_code != 0
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_ood_splits_repeat_drop_and_crop_the_test_frames_and_change_nothing_else(
    folder: Path, tmp_path: Path
) -> None:
    options = {**FAST, "data.cache_dir": str(tmp_path), "data.ood_slow": 2, "data.ood_fast": 2}
    bundle = VideoFolder().build_data({**options, "data.ood_crop": 0.5}, folder, False)
    test = bundle.splits["test"].dataset
    assert {"slow-x2", "fast-x2", "crop-0.5"} <= set(bundle.splits)
    assert bundle.info["max_frames"] == 12  # room for the slowed clips' positions
    for index in range(len(test)):
        clip = test[index]["inputs"]  # 6 frames
        slow, fast, crop = (
            bundle.splits[name].dataset[index] for name in bundle.splits if "-" in name
        )
        assert torch.equal(slow["inputs"], clip.repeat_interleave(2, dim=0))  # frames repeated
        assert torch.equal(fast["inputs"], clip[::2])
        assert torch.equal(crop["inputs"], clip[1:4])  # the middle half
        assert slow["targets"] == fast["targets"] == crop["targets"] == test[index]["targets"]
    assert all(bundle.splits[name].ood for name in ("slow-x2", "fast-x2", "crop-0.5"))
