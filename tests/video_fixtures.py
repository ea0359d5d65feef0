"""Helpers for the video tests: write small videos with PyAV, read shapes back from pixels."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from recipes.moving_shapes import KINDS, question_glyph, shape_mask


def write_video(
    path: Path,
    frames: np.ndarray,
    *,
    codec: str,
    fps: int = 10,
    pixel_format: str = "yuv420p",
) -> Path:
    """Encode uint8 RGB frames (T, H, W, 3) into ``path`` with PyAV; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pixel_format
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def coloured_frames(count: int, colour: tuple[int, int, int], size: int = 32) -> np.ndarray:
    """``count`` frames (T, size, size, 3) of one colour with a bright square moving right."""
    frames = np.zeros((count, size, size, 3), np.uint8)
    frames[:] = colour
    for index in range(count):
        left = (index * 2) % (size - 8)
        frames[index, 8:16, left : left + 8] = 255
    return frames


def visible_runs(frames: np.ndarray, threshold: int = 127) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of frames that hold any bright pixel."""
    visible = frames.reshape(len(frames), -1).max(axis=1) > threshold
    runs, start = [], None
    for index, on in enumerate(visible):
        if on and start is None:
            start = index
        if not on and start is not None:
            runs.append((start, index))
            start = None
    if start is not None:
        runs.append((start, len(frames)))
    return runs


def kind_from_pixels(frame: np.ndarray, shape_size: int, kinds: int) -> int:
    """Which shape kind a frame shows, by matching its bright pixels against each stencil."""
    rows, cols = np.nonzero(frame > 127)
    crop = frame[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] > 127
    for kind in range(kinds):
        stencil = shape_mask(KINDS[kind], shape_size)
        rows_s, cols_s = np.nonzero(stencil)
        tight = stencil[rows_s.min() : rows_s.max() + 1, cols_s.min() : cols_s.max() + 1]
        if tight.shape == crop.shape and np.array_equal(tight, crop):
            return kind
    raise AssertionError("the bright pixels match no shape kind")


def question_from_pixels(frame: np.ndarray, questions: int) -> int:
    """Which question a question frame asks, by matching its top-left tile to each glyph."""
    tile = frame[:8, :8] > 127
    matches = [q for q in range(questions) if np.array_equal(question_glyph(q), tile)]
    assert len(matches) == 1, f"question frame matches {len(matches)} glyphs"
    return matches[0]
