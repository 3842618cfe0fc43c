"""Packages are written all or nothing (shardwise.codegen.staging)."""

from __future__ import annotations

import pytest

from shardwise.codegen.staging import staged_directory, write_files


def test_a_failed_write_leaves_the_old_package_and_no_leftovers(tmp_path):
    target = tmp_path / "pkg"
    with staged_directory(target) as tmp:
        write_files(tmp, {"a.py": "old", "sub/b.py": "old b"})
    with pytest.raises(RuntimeError, match="half way"), staged_directory(target) as tmp:
        write_files(tmp, {"a.py": "new"})
        raise RuntimeError("half way")
    assert (target / "a.py").read_text() == "old" and (target / "sub" / "b.py").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_finished_write_replaces_the_package_whole(tmp_path):
    target = tmp_path / "pkg"
    with staged_directory(target) as tmp:
        write_files(tmp, {"a.py": "old", "gone.py": "x"})
    with staged_directory(target) as tmp:
        write_files(tmp, {"a.py": "new"})
    assert sorted(p.name for p in target.iterdir()) == ["a.py"] and (target / "a.py").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
