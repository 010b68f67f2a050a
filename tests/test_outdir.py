"""The output directory as one transaction (pyprune_fast.outdir): what it refuses, and which errors
inside a write become the user's (a UsageError) and which stay ours. End to end: tests/test_cli.py."""

import os

import pytest

from pyprune_fast import UsageError, io
from pyprune_fast.outdir import OutDir


def test_a_whole_output_is_staged_and_switched_in_with_one_rename(tmp_path):
    out = OutDir(str(tmp_path / "new" / "out"), whole=True)
    with io.Staged() as staged:
        io.write_text(staged.path(out.file("report.json")), '{"command": ["pyprune-fast", "prune"], "files": []}')
        assert not (tmp_path / "new" / "out").exists()
        staged.commit()
        out.commit()
    assert os.listdir(tmp_path / "new" / "out") == ["report.json"] and os.listdir(tmp_path / "new") == ["out"]
    again = OutDir(str(tmp_path / "new" / "out"), whole=True)  # an earlier output is replaced as a whole
    again.remove_created()
    (tmp_path / "new" / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds files that are not the output of an earlier pyprune-fast prune"):
        OutDir(str(tmp_path / "new" / "out"), whole=True)


def test_writes_turns_only_os_errors_into_usage_errors(tmp_path):
    out = OutDir(str(tmp_path / "out"))
    with pytest.raises(UsageError, match="cannot be written: .*No space left on device"):
        with out.writes():
            raise OSError(28, "No space left on device")
    with pytest.raises(ValueError, match="a bug") as raised:
        with out.writes():
            raise ValueError("a bug")
    assert type(raised.value) is ValueError


def test_a_file_in_the_way_is_refused_and_created_directories_go(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        OutDir(str(tmp_path / "file"))
    with pytest.raises(UsageError, match="cannot be written"):
        OutDir(str(tmp_path / "file" / "sub"), whole=True)
    assert os.listdir(tmp_path) == ["file"]
