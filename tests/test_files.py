"""write_text_atomic: the old content or the new, never a mix; nothing left behind on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prime.files import write_text_atomic


def test_replaces_the_file_and_sets_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two", mode=0o600)
    assert target.read_text() == "two"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    write_text_atomic(target, "old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
