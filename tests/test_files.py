"""recipes.files: atomic writes, content digests and storage errors, on their own."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import torch

from recipes import files
from recipes.files import DamagedFile, StorageError


def test_content_digest_ignores_dict_order_and_list_or_tuple_but_sees_every_bit() -> None:
    value = {"b": [1, 2.5, None], "a": {"w": torch.arange(6.0).reshape(2, 3), 3: "x"}}
    reordered = {"a": {3: "x", "w": torch.arange(6.0).reshape(2, 3)}, "b": (1, 2.5, None)}
    assert files.content_digest(value) == files.content_digest(reordered)
    flipped = torch.arange(6.0).reshape(2, 3)
    flipped.view(torch.int32)[1, 2] ^= 1  # the lowest bit of one float
    changed = {**value, "a": {"w": flipped, 3: "x"}}
    assert files.content_digest(changed) != files.content_digest(value)
    assert files.content_digest({"w": torch.zeros(6)}) != files.content_digest(
        {"w": torch.zeros(2, 3)}
    )  # same bytes, another shape


def test_save_verified_round_trips_and_a_changed_digest_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    files.save_verified(path, {"w": torch.ones(3), "step": 4})
    loaded = files.load_verified(path)
    assert loaded["step"] == 4 and torch.equal(loaded["w"], torch.ones(3))
    stored = torch.load(path, weights_only=True)
    torch.save({**stored, "step": 5}, path)  # a value changed after the digest was taken
    with pytest.raises(DamagedFile, match=r"x\.pt is damaged.*do not match the sha256 digest"):
        files.load_verified(path)


def test_a_file_without_digest_is_damage_unless_it_predates_digests(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"format": 1, "w": torch.ones(1)}, path)
    with pytest.raises(DamagedFile, match="holds no digest"):
        files.load_verified(path)
    old = files.load_verified(path, predates_digests=lambda value: value["format"] == 1)
    assert old["format"] == 1


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    files.write_text_atomic(path, "old\n")

    def half_then_fail(stream) -> None:
        stream.write(b"new and half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError) as caught:
        files.write_atomic(path, half_then_fail)
    message = str(caught.value)
    assert f"cannot write {path} (no space left on device, " in message
    assert "free there" in message and "--resume" in message
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.EDQUOT, "(disk quota exceeded; the file system itself has "),
        (errno.EROFS, "(the file system is read-only)"),
        (errno.EIO, "(input/output error)"),
    ],
    ids=["quota", "read-only", "i/o error"],
)
def test_each_storage_fault_is_named_in_the_error(code: int, said: str, tmp_path: Path) -> None:
    def fail(stream) -> None:
        raise OSError(code, "")

    with pytest.raises(StorageError, match=re.escape(f"cannot write {tmp_path / 'x.pt'} {said}")):
        files.write_atomic(tmp_path / "x.pt", fail)
    assert list(tmp_path.iterdir()) == []


def test_torch_saves_own_error_for_a_full_disk_is_reported_as_the_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save turns a failed write into 'RuntimeError: unexpected pos'; the cause is kept."""

    class FullDisk:
        """A stream that takes 100 bytes, then fails as a full disk does."""

        def __init__(self, stream) -> None:
            self.stream, self.room = stream, 100

        def write(self, data: bytes) -> int:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.stream.write(data)

        def flush(self) -> None:
            self.stream.flush()

    real_init = files._KeepingWriteErrors.__init__
    monkeypatch.setattr(
        files._KeepingWriteErrors,
        "__init__",
        lambda self, stream: real_init(self, FullDisk(stream)),
    )
    with pytest.raises(StorageError, match="no space left on device"):
        files.save_verified(tmp_path / "c.pt", {"w": torch.zeros(1000)})
    assert list(tmp_path.iterdir()) == []


def test_previous_file_is_kept_only_once_the_new_one_is_checked(tmp_path: Path) -> None:
    path, previous = tmp_path / "c.pt", tmp_path / "c.prev.pt"
    files.save_verified(path, {"step": 1}, previous=previous)
    assert not previous.exists()
    files.save_verified(path, {"step": 2}, previous=previous)
    assert files.load_verified(previous)["step"] == 1 and files.load_verified(path)["step"] == 2

    def refuse(tmp: Path) -> None:
        raise DamagedFile(f"{tmp} is damaged")

    with pytest.raises(DamagedFile):
        files.write_atomic(path, lambda stream: torch.save({}, stream), refuse, previous)
    assert files.load_verified(path)["step"] == 2 and files.load_verified(previous)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.prev.pt", "c.pt"]


def test_a_vanished_folder_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"its folder .*gone no longer exists"):
        files.write_text_atomic(tmp_path / "gone" / "x.json", "{}")


def test_temporary_files_of_killed_writers_are_removed_and_live_ones_kept(
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True)  # fmt: skip
    dead = tmp_path / f".checkpoint.pt.tmp-{finished.stdout.strip()}"
    alive = tmp_path / f".best.pt.tmp-{os.getpid()}"
    for path in (dead, alive, tmp_path / "checkpoint.pt"):
        path.write_bytes(b"x")
    assert files.remove_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "checkpoint.pt"])


def test_human_sizes() -> None:
    assert [files.human_size(n) for n in (5, 1536, 3 * 2**30)] == ["5 bytes", "1.5 KiB", "3.0 GiB"]
