"""Helpers that write audio fixture trees for the speech tests (nothing is committed as data).

- :func:`write_wav`: a waveform to WAV/FLAC with soundfile (any rate, mono or stereo).
- :func:`speech_commands_tree`: a miniature Google Speech Commands v0.02 tree: word folders of
  short "words" (tones whose pitch depends on the word), validation/testing lists, background
  noise, one 44.1 kHz file and one stereo file.
- :func:`tar_gz`: pack a folder's contents the way the official archive is packed.
- :class:`RangeServer`: an HTTP server on 127.0.0.1 that honours Range requests (resuming).
"""

from __future__ import annotations

import http.server
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile

WORDS_12 = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
OTHER_WORDS = ("bed", "cat", "wow")


def write_wav(path: Path, wave: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    """Write (samples,) or (samples, channels) float audio; the suffix picks WAV or FLAC."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.asarray(wave, dtype=np.float32), rate, subtype=subtype)
    return path


def word_wave(word: str, rng: np.random.Generator, rate: int = 16000) -> np.ndarray:
    """A 0.3-0.6 s tone at a pitch unique to ``word``, inside 1 s of faint noise."""
    pitch = 300.0 + 150.0 * (sum(map(ord, word)) % 20)
    samples = np.zeros(rate, dtype=np.float32)
    length = int(rng.uniform(0.3, 0.6) * rate)
    start = int(rng.integers(0, rate - length))
    t = np.arange(length) / rate
    samples[start : start + length] = 0.4 * np.sin(2 * np.pi * pitch * t)
    return samples + rng.standard_normal(rate).astype(np.float32) * 0.005


@dataclass
class SpeechCommandsTree:
    """What :func:`speech_commands_tree` wrote: root and the expected split memberships."""

    root: Path
    files: dict[str, list[str]] = field(default_factory=dict)  # split -> relative paths
    words: dict[str, str] = field(default_factory=dict)  # relative path -> word
    odd_files: dict[str, str] = field(default_factory=dict)  # "44k", "stereo", "corrupt"


def speech_commands_tree(
    root: Path,
    words: tuple[str, ...] = WORDS_12 + OTHER_WORDS,
    per_word: tuple[int, int, int] = (6, 2, 2),
    seed: int = 0,
    corrupt: bool = False,
) -> SpeechCommandsTree:
    """Write a miniature Speech Commands v0.02 tree; ``per_word`` = (train, val, test) clips."""
    rng = np.random.default_rng(seed)
    tree = SpeechCommandsTree(root, {"train": [], "val": [], "test": []})
    for word in words:
        for split, count in zip(("train", "val", "test"), per_word, strict=True):
            for number in range(count):
                relative = f"{word}/{split[:2]}{number:02d}ab_nohash_{number}.wav"
                write_wav(root / relative, word_wave(word, rng), 16000)
                tree.files[split].append(relative)
                tree.words[relative] = word
    # a 44.1 kHz file and a stereo file among the training clips
    high_rate = tree.files["train"][0]
    wave = word_wave(tree.words[high_rate], rng)
    write_wav(
        root / high_rate, np.interp(np.arange(44100) / 44100, np.arange(16000) / 16000, wave), 44100
    )
    stereo = tree.files["train"][1]
    wave = word_wave(tree.words[stereo], rng)
    write_wav(root / stereo, np.stack([wave, wave * 0.5], axis=1), 16000)
    tree.odd_files = {"44k": high_rate, "stereo": stereo}
    if corrupt:
        bad = f"{words[0]}/zz00bad0_nohash_0.wav"
        (root / bad).write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
        tree.files["train"].append(bad)
        tree.words[bad] = words[0]
        tree.odd_files["corrupt"] = bad
    (root / "validation_list.txt").write_text("\n".join(tree.files["val"]) + "\n")
    (root / "testing_list.txt").write_text("\n".join(tree.files["test"]) + "\n")
    for name, colour in (("white_noise", 0.0), ("pink_noise", 0.9)):
        noise = rng.standard_normal(3 * 16000).astype(np.float32) * 0.1
        for step in range(1, noise.shape[0]):  # a leaky integrator makes it pinkish
            noise[step] += colour * noise[step - 1] * 0.1
        write_wav(root / "_background_noise_" / f"{name}.wav", noise, 16000)
    (root / "LICENSE").write_text("CC BY 4.0 (fixture)\n")
    return tree


def tar_gz(folder: Path, archive: Path) -> Path:
    """Pack the contents of ``folder`` (not the folder itself), like the official archive."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files of a directory, honouring ``Range: bytes=N-`` with 206 responses."""

    requests_seen: list[dict[str, str]]

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests_seen.append({"path": self.path, "range": self.headers.get("Range", "")})
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        header = self.headers.get("Range", "")
        if header.startswith("bytes=") and header.endswith("-"):
            start = int(header[len("bytes=") : -1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


class RangeServer:
    """Context manager: an HTTP server for ``directory`` on 127.0.0.1; ``url(name)``."""

    def __init__(self, directory: Path) -> None:
        handler = type("Handler", (_RangeHandler,), {"requests_seen": []})
        self.requests = handler.requests_seen

        def make(*args, **kwargs):
            return handler(*args, directory=str(directory), **kwargs)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    """Write a fixture tree from the shell: ``python tests/audio_fixtures.py DIR [TRAIN VAL TEST]``.

    Used for the README's CPU smoke run of speech-commands on generated "words".
    """
    import sys

    target = Path(sys.argv[1])
    counts = tuple(int(value) for value in sys.argv[2:5]) or (6, 2, 2)
    tree = speech_commands_tree(target / "speech_commands_v0.02", per_word=counts)  # type: ignore[arg-type]
    print(f"wrote {sum(map(len, tree.files.values()))} clips under {tree.root}")


if __name__ == "__main__":
    main()
