"""The service's parts without a server: micro-batching, the distance gate, the DICOM scope rules, keys."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import make_dicom_bytes

from cxr_embed.readers.deid import IdKey
from cxr_embed.serve.batching import BatchConfig, MicroBatcher
from cxr_embed.serve.scope import decode_upload, sniff_kind

KEY = IdKey(b"serve-parts-test-key-32-bytes!!!", "test")  # already stretched: no scrypt in unit tests


def test_micro_batcher_groups_concurrent_requests() -> None:
    sizes: list[int] = []
    threads: set[str] = set()

    def work(items: list[int]) -> list[int]:
        sizes.append(len(items))
        threads.add(threading.current_thread().name)
        return [i * 10 for i in items]

    async def main() -> list[list[int]]:
        batcher = MicroBatcher(work, BatchConfig(max_batch=8, max_wait_ms=50), ThreadPoolExecutor(1))
        batcher.start()
        try:
            return await asyncio.gather(*[batcher.submit([i]) for i in range(20)])
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert results == [[i * 10] for i in range(20)]
    assert sum(sizes) == 20 and max(sizes) == 8 and len(sizes) <= 4  # 8 + 8 + 4, not 20 calls
    assert len(threads) == 1


def test_micro_batcher_delivers_errors_to_every_caller() -> None:
    def boom(items: list[int]) -> list[int]:
        raise ValueError("bad batch")

    async def main() -> list:
        batcher = MicroBatcher(boom, BatchConfig(max_batch=4, max_wait_ms=20), ThreadPoolExecutor(1))
        batcher.start()
        try:
            return await asyncio.gather(*[batcher.submit([i]) for i in range(3)], return_exceptions=True)
        finally:
            await batcher.stop()

    assert all(isinstance(r, ValueError) for r in asyncio.run(main()))


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({}, None),
        ({"body_part": None}, None),
        ({"modality": "DX"}, None),
        ({"modality": "CT"}, "Modality CT"),
        ({"modality": "Jane Doe's"}, "Modality (not a code string)"),
        ({"body_part": "SKULL"}, "BodyPartExamined SKULL"),
        ({"BurnedInAnnotation": "YES"}, "BurnedInAnnotation"),
        ({"NumberOfFrames": 3}, "multi-frame"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # the point of the free-text case
def test_dicom_scope_is_the_readers_rule(tags: dict, expected: str | None) -> None:
    """Uploads are judged by readers.dicom.out_of_scope (what `index` applies), never echoing free text."""
    dec = decode_upload(make_dicom_bytes(np.full((8, 8), 90), **tags), None, max_pixels=10**6, key=KEY)
    if expected is None:
        assert dec.abstention is None and dec.image is not None and dec.image.size == (8, 8)
    else:
        assert dec.image is None and dec.abstention.code == "out-of-scope"
        assert expected in dec.abstention.detail and "Jane" not in dec.abstention.detail


def test_upload_pseudonyms_are_the_ones_index_stores(tmp_path) -> None:
    """Same key -> an uploaded DICOM's patient and query id equal what the DICOM reader puts in the store,
    so excluding the query's own patient matches the store's rows."""
    from cxr_embed.readers.dicom_headers import read_header

    data = make_dicom_bytes(np.full((8, 8), 90))
    (tmp_path / "a.dcm").write_bytes(data)
    stored = read_header(str(tmp_path / "a.dcm"), KEY)
    dec = decode_upload(data, "application/dicom", max_pixels=10**6, key=KEY)
    assert dec.patient == stored.patient == KEY.patient("CANARY-PID-4242")
    assert dec.query_id == stored.uid and dec.query_id.startswith("2.25.")
    other = decode_upload(data, None, max_pixels=10**6, key=IdKey(b"another-key-of-32-bytes-exactly!", "t"))
    assert other.patient != dec.patient


def test_decoding_never_raises_and_sniffs_magic_bytes() -> None:
    assert sniff_kind(b"\x89PNG\r\n\x1a\n....", "application/dicom") == "png"
    assert sniff_kind(b"x" * 128 + b"DICM", None) == "dicom"
    for junk in (b"", b"\xff\xd8\xff broken jpeg", b"\x89PNG\r\n\x1a\n broken", b"random"):
        dec = decode_upload(junk, "image/png", max_pixels=10**6, key=KEY)
        assert dec.image is None and dec.abstention.code == "undecodable"
    bare = decode_upload(b"\x00" * 300, "application/dicom", max_pixels=10**6, key=KEY)
    assert bare.kind == "dicom" and bare.abstention is not None


def test_distance_gate_from_the_stores_own_neighbours(synthetic_store) -> None:
    from cxr_embed.serve.engine import distance_gate

    gate = distance_gate(synthetic_store, 1.0, 300)
    loose = distance_gate(synthetic_store, 50.0, 300)
    assert gate.sample == 300 and gate.threshold < loose.threshold <= 1.0
    assert abs(loose.threshold - loose.median) < 1e-6
    assert not gate.allows(gate.threshold - 1e-3) and gate.allows(gate.threshold) and not gate.allows(None)


def test_key_ring_verifies_and_sees_revocation(tmp_path) -> None:
    from cxr_embed.errors import ConfigError
    from cxr_embed.serve.keys import KeyRing, add_key, revoke_key

    path = tmp_path / "keys.json"
    with pytest.raises(ConfigError, match="no active key"):
        KeyRing(path)
    entry, token = add_key(path)
    ring = KeyRing(path)
    assert ring.verify(token) == entry.id
    assert ring.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert ring.verify(None) is None and ring.verify("Bearer junk") is None
    revoke_key(path, entry.id)
    assert ring.verify(token) is None
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        KeyRing(path)


def test_batch_size_defaults_to_one_on_cpu_and_sixteen_on_gpu(tmp_path) -> None:
    from cxr_embed.serve.config import ServeConfig, batch_size_for

    auto = ServeConfig(store=tmp_path)
    assert (batch_size_for(auto, "cpu"), batch_size_for(auto, "cuda")) == (1, 16)
    assert batch_size_for(ServeConfig(store=tmp_path, max_batch=4), "cpu") == 4
    assert (
        ServeConfig.from_json(ServeConfig(store=tmp_path, keys=tmp_path / "k.json").to_json()).keys
        == tmp_path / "k.json"
    )


def test_a_timed_out_caller_does_not_stall_the_batcher() -> None:
    """A request that gives up (the server's per-request timeout) is skipped; later ones are answered."""
    import time

    def slow_then_fast(items: list[float]) -> list[float]:
        time.sleep(max(items))
        return items

    async def main() -> list[float]:
        batcher = MicroBatcher(slow_then_fast, BatchConfig(max_batch=1, max_wait_ms=0), ThreadPoolExecutor(1))
        batcher.start()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(batcher.submit([0.5]), 0.05)
            return await asyncio.wait_for(batcher.submit([0.0]), 5)
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [0.0]


def test_audit_rows_are_a_recorded_store_table_that_survives_a_delete(synthetic_store, tmp_path) -> None:
    """Audit parts are recorded in store.json (checked like every result file), shown by the `audit`
    view, kept by `store delete` (they name no image) and still writable by a server opened before it."""
    import shutil

    from cxr_embed.serve.audit import AuditLog, AuditRecord
    from cxr_embed.store import Store, delete_rows, read_manifest, validate_store

    path = tmp_path / "store"
    shutil.copytree(synthetic_store.path, path)
    opened = Store.open(path)
    audit = AuditLog(opened)
    audit.append(AuditRecord("/v1/triage", key_id="k1", status=200, decision="abnormal"))
    assert audit.flush() == 1
    delete_rows(path, patients=["00000001"])
    audit.append(AuditRecord("/v1/search", key_id="k1", status=200))
    assert audit.flush() == 1  # the server's Store predates the delete: audit rows are still accepted
    assert len(read_manifest(path)["results"]["audit"]) == 2
    fresh = Store.open(path)
    rows = fresh.connect().execute("SELECT endpoint, decision FROM audit ORDER BY time").fetchall()
    assert rows == [("/v1/triage", "abnormal"), ("/v1/search", None)] and len(fresh) == 595
    assert validate_store(path).ok


def test_serving_key_must_be_the_one_the_store_was_indexed_with(synthetic_store, tmp_path) -> None:
    """Another key would give an upload's patient another pseudonym: own-patient exclusion would fail
    silently, so the server refuses to start instead."""
    import json
    import shutil

    from cxr_embed.errors import StoreIdentityError
    from cxr_embed.readers.deid import load_key
    from cxr_embed.serve.scope import store_key
    from cxr_embed.store import MANIFEST, Store

    key_file = tmp_path / "id-key"
    key_file.write_text("a-de-identification-key-for-this-test\n")
    key = load_key(key_file)
    path = tmp_path / "store"
    shutil.copytree(synthetic_store.path, path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["identity"] = {"id_key_fingerprint": key.fingerprint}
    (path / MANIFEST).write_text(json.dumps(manifest))
    store = Store.open(path)
    assert store_key(store, key_file).fingerprint == key.fingerprint
    other = tmp_path / "other-key"
    other.write_text("another-de-identification-key-entirely\n")
    with pytest.raises(StoreIdentityError, match=key.fingerprint):
        store_key(store, other)
