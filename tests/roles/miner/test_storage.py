"""Task storage: manifest, hash cache, blobs by hash, and refusing to leave the task directory."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from prime.roles.miner import storage
from prime.roles.miner.storage import (
    BlobNotFound,
    ManifestCache,
    ManifestEntry,
    UnsafePath,
    blob_path,
    manifest,
    open_blob,
    open_relative,
    safe_relative_path,
)

OLD_NS = (time.time_ns() - 3600 * 10**9)  # well outside the racy window


def _write(path: Path, data: bytes, *, old: bool = True) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        os.utime(path, ns=(OLD_NS, OLD_NS))
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "task" / "data"
    data.mkdir(parents=True)
    return data


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    _write(secret, b"host secret\n")
    return secret


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = storage.hash_file

    def counting(root: Path, relative: str):
        calls.append(relative)
        return real(root, relative)

    monkeypatch.setattr(storage, "hash_file", counting)
    return calls


def test_manifest_lists_every_regular_file_with_size_and_hash(root: Path) -> None:
    a = _write(root / "a.txt", b"alpha\n")
    b = _write(root / "sub" / "deep" / "b.bin", os.urandom(3 * 1024 * 1024 + 7))  # more than one read chunk
    empty = _write(root / "sub" / "empty", b"")
    (root / "empty-dir").mkdir()
    assert manifest(root, cache=ManifestCache()) == [
        ManifestEntry("a.txt", 6, a),
        ManifestEntry("sub/deep/b.bin", 3 * 1024 * 1024 + 7, b),
        ManifestEntry("sub/empty", 0, empty),
    ]


def test_manifest_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert manifest(tmp_path / "never-created", cache=ManifestCache()) == []


def test_unchanged_files_are_not_hashed_again(root: Path, counted: list[str]) -> None:
    cache = ManifestCache()
    for i in range(5):
        _write(root / f"f{i}", f"content {i}".encode())
    first = manifest(root, cache=cache)
    assert len(counted) == 5
    counted.clear()
    assert manifest(root, cache=cache) == first
    assert counted == []
    # One file changes (same size, other content, other mtime): only it is hashed again.
    new_hash = _write(root / "f3", b"CONTENT 3")
    os.utime(root / "f3", ns=(OLD_NS + 10**9, OLD_NS + 10**9))
    third = manifest(root, cache=cache)
    assert counted == ["f3"]
    assert {e.path: e.sha256 for e in third}["f3"] == new_hash


def test_a_file_written_just_now_is_hashed_again_next_time(root: Path, counted: list[str]) -> None:
    cache = ManifestCache()
    _write(root / "growing.log", b"step 1\n", old=False)
    manifest(root, cache=cache)
    manifest(root, cache=cache)
    # Within the mtime granularity it could change without its stat changing: never trusted from cache.
    assert counted == ["growing.log", "growing.log"]


def test_deleted_files_leave_the_manifest(root: Path) -> None:
    cache = ManifestCache()
    _write(root / "keep", b"k")
    _write(root / "gone", b"g")
    manifest(root, cache=cache)
    (root / "gone").unlink()
    assert [e.path for e in manifest(root, cache=cache)] == ["keep"]


def test_symlinks_are_skipped_and_their_targets_unreachable(root: Path, outside: Path) -> None:
    cache = ManifestCache()
    inside = _write(root / "real.txt", b"mine\n")
    (root / "file-link").symlink_to(outside)
    (root / "dir-link").symlink_to(outside.parent, target_is_directory=True)
    (root / "dangling").symlink_to(root / "nowhere")
    os.mkfifo(root / "pipe")  # a FIFO must neither be listed nor hang the walk
    assert [e.path for e in manifest(root, cache=cache)] == ["real.txt"]
    secret_hash = hashlib.sha256(outside.read_bytes()).hexdigest()
    with pytest.raises(BlobNotFound):
        blob_path(root, secret_hash, cache=cache)
    with pytest.raises(BlobNotFound):
        open_blob(root, secret_hash, cache=cache)
    assert blob_path(root, inside, cache=cache) == root / "real.txt"
    with pytest.raises(FileNotFoundError):
        open_relative(root, "dir-link/secret.txt")
    with pytest.raises(FileNotFoundError):
        open_relative(root, "file-link")
    with pytest.raises(FileNotFoundError):
        open_relative(root, "pipe")


def test_a_file_swapped_for_a_symlink_after_listing_is_not_served(root: Path, outside: Path) -> None:
    """The task controls /data: it may replace a listed file by a link to a host file with the same content."""
    cache = ManifestCache()
    sha = _write(root / "model.pt", outside.read_bytes())
    assert [e.sha256 for e in manifest(root, cache=cache)] == [sha]
    (root / "model.pt").unlink()
    (root / "model.pt").symlink_to(outside)
    with pytest.raises(BlobNotFound):
        open_blob(root, sha, cache=cache)


def test_a_directory_swapped_for_a_symlink_is_not_followed(root: Path, outside: Path) -> None:
    cache = ManifestCache()
    sha = _write(root / "ckpt" / "secret.txt", outside.read_bytes())
    manifest(root, cache=cache)
    (root / "ckpt" / "secret.txt").unlink()
    (root / "ckpt").rmdir()
    (root / "ckpt").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(BlobNotFound):
        open_blob(root, sha, cache=cache)


def test_open_blob_serves_the_content_with_that_hash(root: Path) -> None:
    cache = ManifestCache()
    data = os.urandom(100_000)
    sha = _write(root / "w" / "weights.bin", data)
    manifest(root, cache=cache)
    f, size = open_blob(root, sha.upper(), cache=cache)  # hex case does not matter
    with f:
        assert size == len(data) and f.read() == data


def test_open_blob_finds_files_written_after_the_last_manifest(root: Path) -> None:
    cache = ManifestCache()
    manifest(root, cache=cache)
    sha = _write(root / "late.txt", b"late\n")
    f, _ = open_blob(root, sha, cache=cache)
    with f:
        assert f.read() == b"late\n"


def test_open_blob_refuses_content_that_changed_since_listing(root: Path) -> None:
    cache = ManifestCache()
    sha = _write(root / "f", b"before")
    manifest(root, cache=cache)
    _write(root / "f", b"after!")  # same size; and no other file has the old hash
    with pytest.raises(BlobNotFound):
        open_blob(root, sha, cache=cache)


@pytest.mark.parametrize("bad", ["", "x" * 64, "abc", "../" + "a" * 61, "a" * 63 + "\x00"])
def test_blob_ids_must_be_sha256_hex(root: Path, bad: str) -> None:
    with pytest.raises(UnsafePath):
        blob_path(root, bad, cache=ManifestCache())


@pytest.mark.parametrize(
    "bad",
    ["", "..", "../x", "a/../../etc/passwd", "a/..", "/etc/passwd", "//etc", "a\x00b", "a\\..\\b", "a\nb", ".", "./", "a/./.."],
)
def test_safe_relative_path_refuses_escapes(bad: str) -> None:
    with pytest.raises(UnsafePath):
        safe_relative_path(bad)


@pytest.mark.parametrize(("given", "normal"), [("a/b.txt", "a/b.txt"), ("a//./b", "a/b"), ("./x", "x"), ("dir/", "dir"), ("..hidden", "..hidden")])
def test_safe_relative_path_normalises(given: str, normal: str) -> None:
    assert safe_relative_path(given) == normal


def test_open_relative_refuses_traversal(root: Path, outside: Path) -> None:
    with pytest.raises(UnsafePath):
        open_relative(root, "../../outside/secret.txt")
    with pytest.raises(UnsafePath):
        open_relative(root, str(outside))
