"""``model pull`` verification without network: files placed by hand are checked, bad ones refused."""

from __future__ import annotations

import hashlib

import pytest

from cxr_embed.errors import DownloadError
from cxr_embed.model import hub
from cxr_embed.model.files import OFFICIAL_SUBFOLDER, TOKENIZER_RELPATH, tiny_model_dir


def test_published_tokenizer_pins_match_the_shipped_files():
    for official in hub.OFFICIAL_FILES:
        if official.relpath.startswith(TOKENIZER_RELPATH):
            assert hub.verify_file(tiny_model_dir() / official.relpath, official) is None


def test_verify_file_names_size_then_hash(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert "size 3 bytes, expected 4" in hub.verify_file(path, hub.OfficialFile("f.bin", 4, "0" * 64))
    assert "sha256 ba7816bf" in hub.verify_file(path, hub.OfficialFile("f.bin", 3, "0" * 64))
    assert hub.verify_file(path, hub.OfficialFile("f.bin", None, hashlib.sha256(b"abc").hexdigest())) is None


def test_files_placed_by_hand_are_verified_without_network(tmp_path, monkeypatch):
    folder = tmp_path / OFFICIAL_SUBFOLDER
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"weights")
    pins = (hub.OfficialFile("a.txt", 7, hashlib.sha256(b"weights").hexdigest()),)
    monkeypatch.setattr(hub, "OFFICIAL_FILES", pins)
    result = hub.pull(dest=tmp_path, endpoint="http://127.0.0.1:9")  # unreachable: must not be needed
    assert result.model_dir == folder
    assert [(f.path.name, f.downloaded) for f in result.files] == [("a.txt", False)]


def test_wrong_file_is_redownloaded_and_offline_fails_clearly(tmp_path, monkeypatch):
    folder = tmp_path / OFFICIAL_SUBFOLDER
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"tampered")
    monkeypatch.setattr(hub, "OFFICIAL_FILES", (hub.OfficialFile("a.txt", 7, "0" * 64),))
    with pytest.raises(DownloadError, match="Could not download a.txt"):
        hub.pull(dest=tmp_path, endpoint="http://127.0.0.1:9")
