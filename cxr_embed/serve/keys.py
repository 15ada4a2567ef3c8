"""API keys for ``cxr-embed serve``: a JSON file of salted key hashes, never the keys themselves.

A key is shown once, when it is made (``cxr_<id>_<secret>``). The file keeps its ``id``, a random
salt, ``sha256(salt + secret)``, a label and the creation/revocation times, written atomically with
mode 0600; the server refuses a file that group or others can read. Why a plain salted SHA-256 and
not a slow password hash: the secret is 256 random bits, so there is nothing to brute-force, and a
per-request check must cost microseconds. The server re-reads the file when it changes, so a
revoked key stops working without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from cxr_embed.atomicio import write_json_atomic
from cxr_embed.errors import ConfigError

KEY_PREFIX = "cxr"
FILE_VERSION = 1
FILE_MODE = 0o600


@dataclass(frozen=True)
class ApiKey:
    """One key as stored: no secret, only its salted hash."""

    id: str
    label: str
    salt: str
    hash: str
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def read_keys(path: str | Path) -> list[ApiKey]:
    """The keys in ``path`` (an absent file has none); ConfigError when unreadable or too open."""
    p = Path(path).expanduser()
    if not p.exists():
        return []
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"API key file {p} is readable by other users (mode {mode:o}); run: chmod 600 {p}")
    try:
        doc = json.loads(p.read_text())
        return [ApiKey(**k) for k in doc["keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"API key file {p} is not a cxr-embed key file ({exc}). Make one with "
            "`cxr-embed serve keys add --keys FILE`."
        ) from None


def _write(path: Path, keys: list[ApiKey]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"version": FILE_VERSION, "keys": [asdict(k) for k in keys]}, path, mode=FILE_MODE)


def add_key(path: str | Path, label: str = "") -> tuple[ApiKey, str]:
    """Make a key, store its salted hash; returns (the stored entry, the token to hand out once)."""
    p = Path(path).expanduser()
    keys = read_keys(p)
    taken = {k.id for k in keys}
    key_id = secrets.token_hex(4)
    while key_id in taken:
        key_id = secrets.token_hex(4)
    secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
    entry = ApiKey(key_id, label, salt, _digest(salt, secret), _now())
    _write(p, [*keys, entry])
    return entry, f"{KEY_PREFIX}_{key_id}_{secret}"


def revoke_key(path: str | Path, key_id: str) -> ApiKey:
    """Mark ``key_id`` revoked (kept in the file, so the audit's key ids stay explainable)."""
    p = Path(path).expanduser()
    keys = read_keys(p)
    match = [k for k in keys if k.id == key_id]
    if not match:
        raise ConfigError(f"No key {key_id!r} in {p}; list them with `cxr-embed serve keys list --keys {p}`.")
    revoked = ApiKey(**{**asdict(match[0]), "revoked_at": match[0].revoked_at or _now()})
    _write(p, [revoked if k.id == key_id else k for k in keys])
    return revoked


class KeyRing:
    """The server's view of a key file: verifies bearer tokens, re-reading the file when it changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, ApiKey] = {}
        self._refresh()
        if not any(k.active for k in self._keys.values()):
            raise ConfigError(
                f"API key file {self.path} has no active key; add one with "
                f"`cxr-embed serve keys add --keys {self.path}`."
            )

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._keys = {k.id: k for k in read_keys(self.path)}
            self._stamp = stamp

    def verify(self, token: str | None) -> str | None:
        """The key id when ``token`` is an active key, else None (never raises on a bad token)."""
        if not token:
            return None
        parts = token.strip().split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            return None
        with self._lock:
            try:
                self._refresh()
            except ConfigError:
                return None  # a broken or loosened file locks everyone out rather than letting all in
            key = self._keys.get(parts[1])
        if key is None or not key.active:
            return None
        return key.id if hmac.compare_digest(key.hash, _digest(key.salt, parts[2])) else None
