"""Atomic writes: all or nothing, and ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from latentaudit._io import atomic_open, read_jsonl, write_json, write_jsonl


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("half")
        raise RuntimeError("killed midway")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "rows.jsonl", [{"x": 1}])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "rows.jsonl").stat().st_mode) == 0o644
    rows = list(read_jsonl(tmp_path / "rows.jsonl", lambda row, where: (row, []), "rows"))
    assert rows == [(1, {"x": 1})]
