"""Checkpoint resume on the miner (seeding.Seeder), with a scripted master: a new attempt's /data gets
the master's copy (verified by sha256), once per attempt, never through a link the task left."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from prime.errors import PeerError
from prime.roles.miner.seeding import Seeder, parse_seed, seeded_attempt

MASTER = "0x" + "1" * 40


class FakeMaster:
    """Answers the seed routes from ``files`` (path → bytes); ``lie`` sends other bytes for a hash."""

    def __init__(self, files: dict[str, bytes], *, status: int | None = None) -> None:
        self.files = files
        self.status = status
        self.lie: set[str] = set()
        self.blobs: list[str] = []

    async def request(self, method: str, url: str, *, audience: str, params: Any = None, **_: Any) -> Any:
        assert audience == MASTER and url.endswith("/tasks/job/seed") and params == {"replica": 1}
        if self.status is not None:
            raise PeerError("refused", status=self.status)
        return {"task_id": "job", "replica": 1, "final": True, "files": [
            {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in self.files.items()]}

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, *, audience: str, params: Any = None) -> AsyncIterator[Any]:
        digest = url.rsplit("/", 1)[1]
        self.blobs.append(digest)
        body = next(b for b in self.files.values() if hashlib.sha256(b).hexdigest() == digest)
        if digest in self.lie:
            body = b"X" * len(body)

        async def chunks(size: int) -> AsyncIterator[bytes]:
            yield body

        yield SimpleNamespace(content=SimpleNamespace(iter_chunked=chunks))


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "tasks" / "job" / "r1" / "data"
    data.mkdir(parents=True)
    return data


async def test_a_new_attempt_gets_the_masters_copy_once(tmp_path: Path) -> None:
    data = _data(tmp_path)
    master = FakeMaster({"ckpt/step.txt": b"step 7\n", "a/b/c.bin": os.urandom(1000), "same": b"kept"})
    (data / "same").write_bytes(b"kept")            # already there with the same content: not fetched
    (data / "local-only").write_bytes(b"mine")      # not in the copy: left alone
    seeder = Seeder(master, lambda: ("http://master", MASTER))

    assert (await seeder.seed("job", 1, 0, data)).files == 0 and master.blobs == []  # attempt 0: nothing to resume
    result = await seeder.seed("job", 1, 2, data)
    assert (result.files, result.fetched, result.skipped) == (3, 2, 0)
    for path, body in master.files.items():
        assert (data / path).read_bytes() == body
    assert (data / "local-only").read_bytes() == b"mine"
    assert oct((data / "ckpt").stat().st_mode & 0o777) == "0o777" and oct((data / "ckpt/step.txt").stat().st_mode & 0o777) == "0o666"
    assert seeded_attempt(data) == 2 and not list(data.parent.glob(".seed-*"))

    # The same attempt again (its container re-created): newer local files are not rolled back.
    (data / "ckpt/step.txt").write_bytes(b"step 9\n")
    assert (await seeder.seed("job", 1, 2, data)).files == 0
    assert (data / "ckpt/step.txt").read_bytes() == b"step 9\n"
    # A later attempt resumes from the master's copy again.
    assert (await seeder.seed("job", 1, 3, data)).fetched == 1
    assert (data / "ckpt/step.txt").read_bytes() == b"step 7\n"


async def test_nothing_is_written_through_a_link_and_bad_bytes_are_refused(tmp_path: Path) -> None:
    data = _data(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, data / "ckpt")                          # left by an earlier attempt's task
    os.symlink(outside / "target", data / "file")               # a link at the file's own path
    master = FakeMaster({"ckpt/step.txt": b"step 7\n", "file": b"plain", "liar": b"honest"})
    master.lie.add(hashlib.sha256(b"honest").hexdigest())
    result = await Seeder(master, lambda: ("http://master", MASTER)).seed("job", 1, 1, data)
    assert (result.fetched, result.skipped) == (1, 2)
    assert list(outside.iterdir()) == []                        # nothing reached the link's target
    assert not (data / "file").is_symlink() and (data / "file").read_bytes() == b"plain"  # the link itself replaced
    assert not (data / "liar").exists() and not list(data.parent.glob(".seed-*"))


@pytest.mark.parametrize("status, marked", [(404, True), (503, False)])
async def test_no_copy_or_no_master_starts_the_attempt_as_it_is(tmp_path: Path, status: int, marked: bool) -> None:
    data = _data(tmp_path)
    result = await Seeder(FakeMaster({}, status=status), lambda: ("http://master", MASTER)).seed("job", 1, 1, data)
    assert result.fetched == 0 and (result.error is None) == marked
    assert seeded_attempt(data) == (1 if marked else -1)        # a failed seed is tried again at the next start
    assert (await Seeder(FakeMaster({}), lambda: (None, None)).seed("job", 1, 2, data)).error == "no master"


def test_a_seed_that_climbs_out_is_refused() -> None:
    with pytest.raises(PeerError):
        parse_seed({"files": [{"path": "../etc/passwd", "size": 1, "sha256": "0" * 64}]})
    with pytest.raises(PeerError):
        parse_seed({"files": "nope"})
    assert [e.path for e in parse_seed({"files": [{"path": "b", "size": 0, "sha256": "0" * 64},
                                                  {"path": "a", "size": 0, "sha256": "0" * 64}]})] == ["a", "b"]
