"""hpcvp.atomic on real files: whole new content after success; old content and no temporary file
after a writer that fails; per-writer temporary names; fsync of a directory."""

from __future__ import annotations

import json
import os

import pytest

from hpcvp.atomic import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    fsync_dir,
    temporary_name,
)


def test_writes_replace_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "file.txt"  # the parent is created
    atomic_write_text(path, "first\n")
    assert path.read_text() == "first\n"
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "a.json").read_text().endswith("\n")
    assert atomic_write_with(tmp_path / "w.bin", lambda handle: handle.write(b"abc")) == 3
    assert (tmp_path / "w.bin").read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.rglob("*") if ".tmp" in p.name) == []


def test_a_failing_writer_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def fail(handle):
        handle.write(b"half of the new")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        atomic_write_with(path, fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]

    with pytest.raises(ValueError), atomic_open(path, "w") as handle:
        handle.write("partial")
        raise ValueError("bad payload")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


def test_temporary_names_are_private_to_the_writer(tmp_path):
    tmp = temporary_name(tmp_path / "manifest.json")
    assert tmp.parent == tmp_path and tmp.name == f".manifest.json.tmp-{os.getpid()}"
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "x", "a"):
        pass


def test_fsync_dir_on_a_directory_and_on_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    fsync_dir(tmp_path)  # no error on a real directory
    fsync_dir(tmp_path / "missing")  # ignored: nothing to make durable
