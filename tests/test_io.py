"""Atomic writes: all or nothing, and ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from latentaudit._io import atomic_open, read_jsonl, write_json, write_jsonl
from latentaudit.errors import LatentAuditError


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


def test_bad_json_lines_report_their_real_line_and_column(tmp_path):
    lines = ['{"x": 1}', '{"x": 1', '', '{"x": 1,, "y": 2}', '{"x": tru}\r']
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LatentAuditError) as err:
        read_jsonl(path, lambda row, where: (row, []), "rows")
    assert str(err.value).splitlines() == [
        f"{path} has 3 problem(s); fix them and rerun:",
        f"  {path}:2: not valid JSON (Expecting ',' delimiter at column 8)",
        f"  {path}:4: not valid JSON (Expecting property name enclosed in double quotes at "
        "column 9)",
        f"  {path}:5: not valid JSON (Expecting value at column 7)"]


def test_parse_problems_and_repeats_are_listed_together(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n[]\n{"id": 1}\n')

    def parse(row, where):
        return (row, []) if isinstance(row, dict) else (None, [f"{where}: not an object"])

    with pytest.raises(LatentAuditError, match=r"(?s)2 problem.*:2: not an object.*:3: id 1 "
                                                r"repeats line 1"):
        read_jsonl(path, parse, "rows", unique=("id", lambda row: row["id"]))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LatentAuditError, match="holds no rows"):
        read_jsonl(tmp_path / "empty.jsonl", parse, "rows")
