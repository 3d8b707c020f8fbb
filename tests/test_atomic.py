"""atomic_dir replaces a folder whole, and a failure while it swaps folders loses nothing."""

from __future__ import annotations

import os

import pytest

from cmdfed.atomic import atomic_dir, exclusive_lock
from cmdfed.errors import CmdfedError


def _fill(folder, text: str) -> None:
    (folder / "weights.bin").write_text(text)
    (folder / "inner").mkdir()
    (folder / "inner" / "meta.json").write_text(text)


def test_atomic_dir_replaces_the_folder_and_leaves_no_siblings(tmp_path):
    target = tmp_path / "round-0001"
    target.mkdir()
    _fill(target, "old")
    with atomic_dir(target) as tmp:
        _fill(tmp, "new")
    assert (target / "weights.bin").read_text() == "new"
    assert (target / "inner" / "meta.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0001"]


def test_a_failed_final_rename_keeps_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "round-0001"
    target.mkdir()
    _fill(target, "old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".partial"):  # the new folder's rename over the target
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"), atomic_dir(target) as tmp:
        _fill(tmp, "new")
    assert (target / "weights.bin").read_text() == "old"
    assert (target / "inner" / "meta.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0001"]


def test_a_failure_while_writing_leaves_the_old_folder_alone(tmp_path):
    target = tmp_path / "round-0001"
    target.mkdir()
    _fill(target, "old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0001"]


def test_a_held_lock_refuses_a_second_holder_that_will_not_wait(tmp_path):
    lock = tmp_path / "out" / ".lock"
    with exclusive_lock(lock), pytest.raises(CmdfedError, match="busy here"), exclusive_lock(lock, busy="busy here"):
        pass
    with exclusive_lock(lock, busy="busy here"):  # released when the first block ended
        pass
