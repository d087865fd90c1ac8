"""Encrypted key files (Ethereum JSON keystores) and the one way every role loads its key.

A key file is eth-account's v3 keystore (scrypt by default), written with mode 0600 from
the moment it exists and never over an existing file. Keystores carry their address in
clear, so showing the address needs no password. A raw hex key from ``PRIME_PRIVATE_KEY``
is accepted only when no key file is given, for the devnet's throwaway accounts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Literal

import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from prime.config import DEFAULT_PASSWORD_ENV
from prime.errors import KeyError_

log = logging.getLogger(__name__)

KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
RAW_KEY_ENV = "PRIME_PRIVATE_KEY"
_HEX_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")


def normalize_private_key(text: str) -> bytes:
    """32 key bytes from hex text (``0x`` optional, surrounding whitespace ignored)."""
    text = text.strip()
    if not _HEX_KEY.match(text):
        raise KeyError_("A private key must be 64 hex characters (32 bytes), optionally prefixed with 0x.")
    key = bytes.fromhex(text.removeprefix("0x"))
    try:
        Account.from_key(key)
    except Exception:  # zero or >= the curve order
        raise KeyError_("That private key is not a valid secp256k1 key; check that it was copied in full.") from None
    return key


def key_file_path(target: str | Path, address: str) -> Path:
    """``target`` itself, or ``<address>.json`` inside it when it is a directory."""
    path = Path(target).expanduser()
    return path / f"{address}.json" if path.is_dir() else path


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) if missing; a directory we create is 0700."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, mode=KEY_DIR_MODE)
        os.chmod(directory, KEY_DIR_MODE)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        if not directory.is_dir():
            raise KeyError_(f"{directory} exists and is not a directory; choose another place for the key file.") from None
    except OSError as exc:
        raise KeyError_(f"Cannot create the directory {directory} ({exc.strerror}); check the path and its permissions.") from None


def _write_and_close(fd: int, content: bytes) -> None:
    """Owner-only permissions, the bytes, on disk, closed."""
    try:
        os.fchmod(fd, KEY_FILE_MODE)
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_private_file(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` with mode 0600, atomically, failing if ``path`` exists.

    The bytes go to a 0600 temporary file first, which is then hard-linked into place:
    the link fails if the target exists, so no existing key is ever overwritten and the
    key file never exists with looser permissions or half-written.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), KEY_FILE_MODE)
    _write_and_close(fd, content)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KeyError_(f"{path} already exists; prime never overwrites a key file, so choose another path with --out.") from None
    except OSError:
        # A filesystem without hard links: fall back to an exclusive create.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        except FileExistsError:
            raise KeyError_(f"{path} already exists; prime never overwrites a key file, so choose another path with --out.") from None
        _write_and_close(fd, content)
    finally:
        tmp.unlink(missing_ok=True)


def create_keystore(
    path: str | Path,
    password: str,
    private_key: str | None = None,
    *,
    kdf: Literal["scrypt", "pbkdf2"] = "scrypt",
    iterations: int | None = None,
) -> str:
    """Encrypt a new (or the given hex) private key into ``path``; return its checksum address.

    ``path`` may be an existing directory: the file is then ``<address>.json`` inside it.
    ``kdf``/``iterations`` pass through to ``Account.encrypt`` (tests use cheap pbkdf2).
    """
    if not password:
        raise KeyError_("The password is empty; choose a non-empty password for the key file.")
    key = normalize_private_key(private_key) if private_key is not None else Account.create().key
    account = Account.from_key(key)
    target = key_file_path(path, account.address)
    if target.exists() or target.is_symlink():
        raise KeyError_(f"{target} already exists; prime never overwrites a key file, so choose another path with --out.")
    ensure_private_dir(target.parent)
    keystore = Account.encrypt(key, password, kdf=kdf, iterations=iterations)
    try:
        _write_new_private_file(target, json.dumps(keystore).encode())
    except PermissionError:
        raise KeyError_(f"Cannot write {target}: permission denied; choose a directory you own.") from None
    return account.address


def read_keystore(path: str | Path) -> dict[str, Any]:
    """The keystore JSON of ``path``; each way it can be wrong is one sentence."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyError_(f"Key file {path} does not exist; check the path or create one with `prime keys new`.") from None
    except IsADirectoryError:
        raise KeyError_(f"{path} is a directory, not a key file; name the .json key file itself.") from None
    except PermissionError:
        raise KeyError_(f"Key file {path} is not readable by this user; check its owner and permissions.") from None
    except OSError as exc:
        raise KeyError_(f"Cannot read key file {path} ({exc.strerror}); check the path.") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeyError_(f"Key file {path} is not valid JSON; it must be a keystore written by `prime keys new`.") from None
    if not isinstance(data, dict) or not isinstance(data.get("crypto", data.get("Crypto")), dict):
        raise KeyError_(f"Key file {path} is JSON but not an encrypted keystore; create one with `prime keys new`.")
    return data


def keystore_address(keystore: dict[str, Any]) -> str | None:
    """Checksum address stored in clear in a keystore, or None if absent/invalid."""
    raw = keystore.get("address")
    if not isinstance(raw, str):
        return None
    raw = raw if raw.startswith("0x") else "0x" + raw
    try:
        return to_checksum_address(raw)
    except ValueError:
        return None


def permission_warning(path: str | Path) -> str | None:
    """One sentence if the key file is readable by group or others, else None."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return f"Key file {path} is accessible by other users (mode {mode:04o}); run `chmod 600 {path}`."
    return None


def resolve_password(
    password: str | None,
    password_env: str = DEFAULT_PASSWORD_ENV,
    *,
    prompt: bool = True,
    confirm: bool = False,
    what: str = "key file",
) -> str:
    """The password: given, else ``$password_env``, else a hidden prompt (when allowed)."""
    if password is not None:
        return password
    from_env = os.environ.get(password_env)
    if from_env:
        return from_env
    if not prompt:
        raise KeyError_(f"The {what} needs a password; set the environment variable {password_env}.")
    try:
        return typer.prompt(f"Password for the {what}", hide_input=True, confirmation_prompt=confirm)
    except (typer.Abort, EOFError):
        raise KeyError_(f"No password was entered; type it at the prompt or set {password_env}.") from None


def decrypt_keystore(keystore: dict[str, Any], password: str, *, path: str | Path = "the key file", password_env: str = DEFAULT_PASSWORD_ENV) -> LocalAccount:
    try:
        key = Account.decrypt(keystore, password)
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise KeyError_(f"Wrong password for {path}; check {password_env} or type the password again.") from None
        raise KeyError_(f"Key file {path} is not a keystore prime can read ({exc}).") from None
    except Exception as exc:  # malformed fields inside an otherwise valid JSON keystore
        raise KeyError_(f"Key file {path} is damaged or not a standard keystore ({type(exc).__name__}).") from None
    return Account.from_key(key)


def load_account(
    key_file: str | Path | None,
    *,
    password: str | None = None,
    password_env: str = DEFAULT_PASSWORD_ENV,
    prompt: bool = True,
) -> LocalAccount:
    """The account every role signs with.

    ``key_file`` None means a raw hex key from ``$PRIME_PRIVATE_KEY`` (devnet only);
    otherwise the keystore is decrypted with ``password``, ``$password_env`` or a prompt.
    """
    if key_file is None or str(key_file) == "":
        raw = os.environ.get(RAW_KEY_ENV)
        if raw:
            try:
                return Account.from_key(normalize_private_key(raw))
            except KeyError_:
                raise KeyError_(f"{RAW_KEY_ENV} does not hold a valid 64-hex-digit private key; fix it or use --key-file.") from None
        raise KeyError_("No key given; pass --key-file (or set PRIME_KEY_FILE) to a key file made by `prime keys new`.")
    path = Path(key_file).expanduser()
    keystore = read_keystore(path)
    warning = permission_warning(path)
    if warning:
        log.warning(warning)
    secret = resolve_password(password, password_env, prompt=prompt)
    account = decrypt_keystore(keystore, secret, path=path, password_env=password_env)
    stored = keystore_address(keystore)
    if stored is not None and stored != account.address:
        # The clear-text address is what `keys show` prints; a mismatch means tampering.
        raise KeyError_(f"Key file {path} claims address {stored} but holds the key of {account.address}; do not use it.")
    return account
