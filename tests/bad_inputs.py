"""Generators of the bad-input corpus: broken or unusual audio, arrays, videos and files.

Every file is written by the tests at run time (nothing is committed as data). Each generator
takes a target path and writes one item; :data:`AUDIO_ITEMS`, :data:`NPY_ITEMS` and
:data:`VIDEO_ITEMS` name them so a test table can refer to a case by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile

RATE = 16000


def tone(seconds: float, rate: int = RATE, pitch: float = 440.0) -> np.ndarray:
    """A mono sine at ``pitch`` Hz, amplitude 0.3 (float32)."""
    time = np.arange(int(round(seconds * rate))) / rate
    return (0.3 * np.sin(2 * np.pi * pitch * time)).astype(np.float32)


def write_wav(path: Path, wave: np.ndarray, rate: int = RATE, subtype: str | None = None) -> Path:
    """Write float audio as WAV with soundfile in the given sample format (subtype)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave, rate, subtype=subtype, format="WAV")
    return path


def zero_byte_wav(path: Path) -> Path:
    """An empty file named .wav."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def truncated_wav(path: Path) -> Path:
    """A valid WAV cut inside its header (the first 30 of its 44 header bytes)."""
    write_wav(path, tone(0.5))
    path.write_bytes(path.read_bytes()[:30])
    return path


def not_audio_wav(path: Path) -> Path:
    """A text file with a .wav name (a mislabelled file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is a shopping list, not a recording\n" * 20)
    return path


def zero_sample_wav(path: Path) -> Path:
    """A well-formed WAV header with no samples at all (a 0-sample clip)."""
    return write_wav(path, np.zeros(0, np.float32))


def nan_wav(path: Path) -> Path:
    """A float WAV whose samples include NaN (soundfile reads it; training must not)."""
    wave = tone(0.3)
    wave[100:200] = np.nan
    return write_wav(path, wave, subtype="FLOAT")


def one_sample_wav(path: Path) -> Path:
    """Valid audio: a clip of a single sample (shorter than one analysis window)."""
    return write_wav(path, np.full(1, 0.1, np.float32))


def five_ms_wav(path: Path) -> Path:
    """Valid audio: 5 ms, shorter than half of the 25 ms analysis window."""
    return write_wav(path, tone(0.005))


def wav_8bit(path: Path) -> Path:
    """Valid audio: unsigned 8-bit PCM."""
    return write_wav(path, tone(0.5, pitch=300.0), subtype="PCM_U8")


def wav_24bit(path: Path) -> Path:
    """Valid audio: 24-bit PCM."""
    return write_wav(path, tone(0.5, pitch=300.0), subtype="PCM_24")


def wav_float(path: Path) -> Path:
    """Valid audio: 32-bit IEEE float samples."""
    return write_wav(path, tone(0.5, pitch=300.0), subtype="FLOAT")


def very_long_wav(path: Path, seconds: float = 60.0) -> Path:
    """Valid audio a minute long at 8 kHz (far beyond a keyword clip; cropped by the recipes)."""
    return write_wav(path, tone(seconds, rate=8000, pitch=300.0), rate=8000, subtype="PCM_16")


AUDIO_ITEMS: dict[str, Callable[[Path], Path]] = {
    "zero-byte": zero_byte_wav,
    "truncated": truncated_wav,
    "not-audio": not_audio_wav,
    "zero-samples": zero_sample_wav,
    "nan-samples": nan_wav,
}
VALID_AUDIO_ITEMS: dict[str, Callable[[Path], Path]] = {
    "8-bit": wav_8bit,
    "24-bit": wav_24bit,
    "float": wav_float,
    "very-long": very_long_wav,
    "one-sample": one_sample_wav,
    "5-ms": five_ms_wav,
}


def audio_class_folder(root: Path, per_class: int = 6, seconds: float = 0.3) -> Path:
    """Two classes (low/high tones) of good 16-bit WAVs: the healthy part of a corpus folder."""
    for label, pitch in (("low", 300.0), ("high", 2000.0)):
        for index in range(per_class):
            write_wav(root / label / f"clip{index}.wav", tone(seconds, pitch=pitch))
    return root


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def npy_with_nan(path: Path, features: int = 4) -> Path:
    """A (time, features) float array with one NaN."""
    array = np.ones((6, features), np.float32)
    array[2, 1] = np.nan
    return _save(path, array)


def npy_wrong_rank(path: Path, features: int = 4) -> Path:
    """A rank-3 array where (time, features) is expected."""
    return _save(path, np.ones((2, 6, features), np.float32))


def npy_wrong_dtype(path: Path, features: int = 4) -> Path:
    """An array of strings (not numbers)."""
    return _save(path, np.array([["x"] * features] * 6))


def npy_not_numpy(path: Path, features: int = 4) -> Path:
    """Bytes that are not a .npy file at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x93NUMPY but then nothing sensible")
    return path


def npy_infinite(path: Path, features: int = 4) -> Path:
    """A float array of infinities."""
    return _save(path, np.full((6, features), np.inf, np.float32))


def npy_rank_one(path: Path, features: int = 4) -> Path:
    """A 1-D array (no feature axis)."""
    return _save(path, np.ones(6, np.float32))


def npy_objects(path: Path, features: int = 4) -> Path:
    """An object array (stored with pickle, which the recipe must not unpickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.array([{"frames": 6}], dtype=object), allow_pickle=True)
    return path


NPY_ITEMS: dict[str, Callable[..., Path]] = {
    "nan": npy_with_nan,
    "wrong-rank": npy_wrong_rank,
    "wrong-dtype": npy_wrong_dtype,
    "not-numpy": npy_not_numpy,
    "infinite": npy_infinite,
    "rank-one": npy_rank_one,
    "objects": npy_objects,
}


def npy_class_folder(root: Path, per_class: int = 6, features: int = 4) -> Path:
    """Two classes of good (time, features) float arrays with different means."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("down", "up")):
        for index in range(per_class):
            array = rng.normal(3.0 * label, 1.0, size=(int(rng.integers(4, 9)), features))
            _save(root / name / f"item{index}.npy", array.astype(np.float32))
    return root


def corrupt_video(path: Path) -> Path:
    """Random bytes named .mp4."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    return path


def empty_video(path: Path) -> Path:
    """A zero-byte file named .avi."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def text_named_video(path: Path) -> Path:
    """A text file named .mp4 (a mislabelled file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a video\n")
    return path


def truncated_video(path: Path) -> Path:
    """A valid MPEG-4 file cut in half (its index, written last, is lost)."""
    from video_fixtures import coloured_frames, write_video

    write_video(path, coloured_frames(8, (90, 200, 90), size=16), codec="mpeg4")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


VIDEO_ITEMS: dict[str, Callable[[Path], Path]] = {
    "corrupt": corrupt_video,
    "empty": empty_video,
    "text": text_named_video,
    "truncated": truncated_video,
}


def video_class_folder(root: Path, per_class: int = 3) -> Path:
    """red/ and blue/ folders of short MPEG-4 videos (a bright square over a flat colour)."""
    from video_fixtures import coloured_frames, write_video

    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        for index in range(per_class):
            frames = coloured_frames(8, colour, size=16)
            write_video(root / label / f"clip{index}.mp4", frames, codec="mpeg4")
    return root


# --- damaged files cope wrote itself (checkpoints, caches) ----------------------------------------
def truncate_file(path: Path) -> Path:
    """Keep the first half of a file (a copy cut short, a write that hit a full quota)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def zero_block(path: Path, size: int = 64) -> Path:
    """Zero ``size`` bytes in the middle of the largest tensor record (a bad disk block)."""
    start, length = largest_record(path)
    offset = start + max(0, length // 2 - size // 2)
    data = bytearray(path.read_bytes())
    data[offset : offset + min(size, length)] = bytes(min(size, length))
    path.write_bytes(bytes(data))
    return path


def flip_bit(path: Path) -> Path:
    """Flip one bit in the middle of the largest tensor record of a ``torch.save`` file."""
    start, length = largest_record(path)
    data = bytearray(path.read_bytes())
    data[start + length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def wrong_digest(path: Path) -> Path:
    """Re-save a verified file with a digest that does not match its contents."""
    import torch

    value = torch.load(path, weights_only=True)
    value["sha256"] = "0" * 64
    torch.save(value, path)
    return path


def largest_record(path: Path) -> tuple[int, int]:
    """(offset, length) of the bytes of the largest tensor record in a ``torch.save`` zip."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist() if "/data/" in info.filename]
        info = max(records, key=lambda info: info.file_size)
    with path.open("rb") as stream:  # the local header: 30 bytes, then name and extra field
        stream.seek(info.header_offset)
        header = stream.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


DAMAGED_FILES: dict[str, Callable[[Path], Path]] = {
    "truncated": truncate_file,
    "bit flip in a tensor record": flip_bit,
    "64 zero bytes in a tensor record": zero_block,
    "wrong digest": wrong_digest,
}
