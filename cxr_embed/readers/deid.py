"""The de-identification key and everything derived from it: pseudonymous UIDs, patients, file references.

Why a secret key and not a salt: a pseudonym made with a public string is reversed by hashing every
plausible Patient ID (a few million MRNs take microseconds each). The key is 32 random bytes kept in
a user-only file (``~/.config/cxr-embed/id-key``, mode 0600, created on first use and announced
once), or given with ``--key-file`` / ``$CXR_EMBED_ID_SALT``. It is stretched with scrypt once per
run, so even a weak user-chosen key costs an attacker ~50 ms per guess, and the store keeps only
:attr:`IdKey.fingerprint` (a hash of the stretched key), so a resume with another key is refused
instead of silently splitting every patient in two.

Derived values (HMAC-SHA256 under the stretched key, one domain per kind, so equal inputs of
different kinds never collide):

* UIDs -> ``2.25.<integer>`` (PS3.5 B.2 UUID-derived form, at most 44 characters), stable per key;
* Patient ID -> 16 hex digits;
* a file's path relative to the source -> ``ref-<24 hex>``: what the store keeps instead of a path
  (folder names in PACS exports are Patient IDs and accession numbers); the link file maps it back;
* per-patient date shift (0-3650 days) so the listing cache can order studies without holding dates.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from cxr_embed.atomicio import write_bytes_atomic
from cxr_embed.errors import ConfigError

KEY_ENV = "CXR_EMBED_ID_SALT"
KEY_FILE_NAME = "id-key"
MIN_KEY_CHARS = 16
_STRETCH_SALT = b"cxr-embed de-identification key v1"
_SHIFT_DAYS = 3650


@dataclass(frozen=True)
class IdKey:
    """A stretched de-identification key (``mac_key``) and where it came from (for messages)."""

    mac_key: bytes
    origin: str

    @property
    def fingerprint(self) -> str:
        """What a store records to recognise the key (reveals nothing usable about it)."""
        return hashlib.sha256(b"fingerprint\0" + self.mac_key).hexdigest()[:16]

    def _mac(self, domain: bytes, value: bytes) -> bytes:
        return hmac.new(self.mac_key, domain + b"\0" + value, hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """A keyed pseudonymous UID ``2.25.<integer>`` (the same input always gives the same output)."""
        return "2.25." + str(int.from_bytes(self._mac(b"uid", uid.encode())[:16], "big"))

    def patient(self, patient_id: str) -> str:
        """Pseudonymous patient id: 16 hex digits."""
        return self._mac(b"patient", patient_id.encode()).hex()[:16]

    def reference(self, relative_path: bytes) -> str:
        """The stored stand-in for a file path (relative to the source, as bytes: any file name works)."""
        return "ref-" + self._mac(b"path", relative_path).hex()[:24]

    def digest(self, data: bytes) -> str:
        """A keyed digest (listing cache keys: path + size + mtime, so the cache holds no time stamp)."""
        return self._mac(b"cache", data).hex()[:32]

    def date_shift_seconds(self, patient_id: str) -> int:
        """A per-patient shift (whole days) that keeps one patient's study order and hides the dates."""
        return int.from_bytes(self._mac(b"shift", patient_id.encode())[:4], "big") % _SHIFT_DAYS * 86400


def stretch(secret: bytes, origin: str) -> IdKey:
    """scrypt the secret once (n=2^14: ~50 ms), so guessing a weak key is slow."""
    if len(secret.strip()) < MIN_KEY_CHARS:
        raise ConfigError(
            f"The de-identification key from {origin} is too short to be a secret ({len(secret.strip())} "
            f"characters; at least {MIN_KEY_CHARS} random ones are needed). Leave it unset to have cxr-embed "
            "create one, or make one with: python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    mac_key = hashlib.scrypt(secret.strip(), salt=_STRETCH_SALT, n=2**14, r=8, p=1, dklen=32)
    return IdKey(mac_key, origin)


def default_key_file() -> Path:
    """``<user config dir>/cxr-embed/id-key`` ($XDG_CONFIG_HOME on Linux)."""
    import platformdirs

    return Path(platformdirs.user_config_dir("cxr-embed")) / KEY_FILE_NAME


def load_key(key_file: str | Path | None = None) -> IdKey:
    """The key from ``key_file``, else ``$CXR_EMBED_ID_SALT``, else the user's key file (created if absent).

    Creating the default key file prints its path once to stderr: the data owner must back it up,
    since adding to a store later needs the same key.
    """
    if key_file is not None:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"Key file {path} does not exist. Give the key file this store was made with.")
        return stretch(path.read_bytes(), f"key file {path}")
    env = os.environ.get(KEY_ENV)
    if env:
        return stretch(env.encode(), f"${KEY_ENV}")
    path = default_key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_bytes_atomic(secrets.token_hex(32).encode() + b"\n", path, mode=0o600)
        print(
            f"Created a de-identification key in {path} (readable by you only). Keep it secret and back it "
            "up: adding to a store made with it needs the same key (--key-file).",
            file=sys.stderr,
        )
    return stretch(path.read_bytes(), f"key file {path}")
