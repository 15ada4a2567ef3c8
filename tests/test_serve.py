"""``cxr-embed serve`` end to end: a real uvicorn process on loopback over a tiny-model store, real HTTP.

One server (module scope) answers every test in file order; the last tests stop it and check the
audit table against the calls made, and search every response, the server log and every store
file for the canary identifiers planted in the uploaded DICOMs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import CANARIES, free_port, make_dicom_bytes, start_server

from cxr_embed.errors import ConfigError

pytestmark = pytest.mark.slow
SALT = "serve-test-de-identification-key"
K = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_store, synth_cxr14):
    """(store path, key file, tokens, image paths, link file): a copy of tiny_store with a saved `lr` classifier."""
    from cxr_embed.evaluation import ClassifyConfig, classify_store
    from cxr_embed.serve.keys import add_key
    from cxr_embed.store import Store

    root = tmp_path_factory.mktemp("serve")
    path = root / "store"
    shutil.copytree(tiny_store.path, path)
    store = Store.open(path)
    classify_store(store, ClassifyConfig(models=("lr",), folds=3, n_boot=20, plots=False))
    keys = root / "keys.json"
    _, good = add_key(keys, "tests")
    revoked_entry, revoked = add_key(keys, "to revoke")
    meta = store.metadata(["image_id", "path", "patient_id"]).to_pylist()
    link = root / "link.csv"
    link.write_text("image_id,path\n" + "".join(f"{r['image_id']},{r['path']}\n" for r in meta))
    return {
        "store": path,
        "keys": keys,
        "good": good,
        "revoked": revoked,
        "revoked_id": revoked_entry.id,
        "rows": meta,
        "link": link,
        "root": root,
    }


class Recorder:
    """Counts audited calls and keeps every response body (for the canary check)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []  # (endpoint, status) of every audited call
        self.bodies: list[bytes] = []

    def client(self, url: str, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        def on_response(response: httpx.Response) -> None:
            response.read()
            self.bodies.append(response.content)
            if response.request.url.path.startswith("/v1/") or response.request.url.path == "/lookup":
                self.calls.append((response.request.url.path, response.status_code))

        return httpx.Client(
            base_url=url, headers=headers, timeout=60, event_hooks={"response": [on_response]}
        )


@pytest.fixture(scope="module")
def server(served):
    from cxr_embed.model import tiny_model_dir

    log = served["root"] / "server.log"
    dicom_port = free_port()
    proc = start_server(
        [
            "--store",
            str(served["store"]),
            "--model-dir",
            str(tiny_model_dir()),
            "--keys",
            str(served["keys"]),
            "--classifier",
            "lr",
            "--device",
            "cpu",
            "-k",
            str(K),
            "--link-file",
            str(served["link"]),
            "--dicom-port",
            str(dicom_port),
        ],
        log,
        env={"CXR_EMBED_ID_SALT": SALT},
    )
    recorder = Recorder()
    yield {
        "proc": proc,
        "url": proc.url,
        "rec": recorder,
        "api": recorder.client(proc.url, served["good"]),
        "log": log,
        "dicom_port": dicom_port,
        **served,
    }
    proc.stop()


def png_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def gray_pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def test_health_is_open_and_ready(server) -> None:
    anon = server["rec"].client(server["url"], None)
    assert anon.get("/healthz").json() == {"status": "ok"}
    ready = anon.get("/readyz")
    assert ready.status_code == 200 and ready.json()["rows"] == 40
    assert "/v1/triage" in anon.get("/openapi.json").json()["paths"]


def test_triage_png_returns_probability_decisions_and_neighbours(server) -> None:
    row = server["rows"][0]
    res = server["api"].post(
        "/v1/triage", content=png_bytes(row["path"]), headers={"Content-Type": "image/png"}
    )
    assert res.status_code == 200, res.text
    doc = res.json()
    item = doc["results"][0]
    assert item["abstain"] is False and 0.0 <= item["probability"] <= 1.0
    assert item["probability_source"] == "classifier"
    assert set(item["decisions"]) == set(doc["classifier"]["thresholds"]) and item["decisions"]
    assert doc["classifier"]["name"] == "lr" and doc["classifier"]["run_id"].startswith("classify")
    assert (
        len(doc["classifier"]["sha256"]) == 64 and doc["model"]["model_id"] == "cxr-embed-tiny-parity-fixture"
    )
    assert len(item["neighbors"]) == K
    top = item["neighbors"][0]
    assert top["image_id"] == row["image_id"] and top["similarity"] > 0.999  # the same file is stored
    assert set(top) == {
        "rank",
        "image_id",
        "patient_id",
        "similarity",
        "label",
        "findings",
        "view",
    }  # no path
    assert doc["distance_gate"]["sample"] > 0 and -1 <= doc["distance_gate"]["threshold"] <= 1


def test_triage_excludes_the_given_patient(server) -> None:
    row = server["rows"][0]
    res = server["api"].post(
        "/v1/triage",
        params={"patient_id": row["patient_id"], "k": 6},
        content=png_bytes(row["path"]),
        headers={"Content-Type": "image/png"},
    )
    item = res.json()["results"][0]
    assert item["patient_excluded"] is True and len(item["neighbors"]) == 6
    assert all(n["patient_id"] != row["patient_id"] for n in item["neighbors"])


def test_triage_dicom_chest_radiograph(server) -> None:
    data = make_dicom_bytes(gray_pixels(server["rows"][1]["path"]))
    res = server["api"].post("/v1/triage", content=data, headers={"Content-Type": "application/dicom"})
    assert res.status_code == 200, res.text
    item = res.json()["results"][0]
    assert item["input"]["kind"] == "dicom" and item["abstain"] is False
    assert 0.0 <= item["probability"] <= 1.0 and len(item["neighbors"]) == K
    assert item["patient_excluded"] is True  # its Patient ID was pseudonymised and excluded
    assert item["query_id"].startswith("2.25.") and "7777" not in item["query_id"]  # keyed, not the UID


def test_multipart_mixes_answers_and_abstentions(server) -> None:
    px = gray_pixels(server["rows"][2]["path"])
    files = [
        ("file", ("a.png", png_bytes(server["rows"][2]["path"]), "image/png")),
        ("file", ("ct.dcm", make_dicom_bytes(px, modality="CT"), "application/dicom")),
        ("file", ("head.dcm", make_dicom_bytes(px, body_part="HEAD"), "application/dicom")),
        ("file", ("burned.dcm", make_dicom_bytes(px, BurnedInAnnotation="YES"), "application/dicom")),
        ("file", ("junk.bin", b"\x00garbage" * 50, "application/octet-stream")),
        ("file", ("broken.png", png_bytes(server["rows"][2]["path"])[:200], "image/png")),
    ]
    res = server["api"].post("/v1/triage", files=files)
    assert res.status_code == 200, res.text
    items = res.json()["results"]
    assert [i["abstain"] for i in items] == [False, True, True, True, True, True]
    codes = [i["reason"]["code"] for i in items[1:]]
    assert codes == ["out-of-scope", "out-of-scope", "out-of-scope", "undecodable", "undecodable"]
    assert "Modality CT" in items[1]["reason"]["detail"]
    assert "BurnedInAnnotation is YES" in items[3]["reason"]["detail"]
    assert "Traceback" not in res.text


def test_single_garbage_body_abstains_without_traceback(server) -> None:
    res = server["api"].post(
        "/v1/triage", content=b"not an image at all", headers={"Content-Type": "image/png"}
    )
    assert res.status_code == 200
    item = res.json()["results"][0]
    assert item["abstain"] is True and item["reason"]["code"] == "undecodable"
    empty = server["api"].post("/v1/triage", content=b"", headers={"Content-Type": "image/png"})
    assert empty.status_code == 400 and "No image" in empty.json()["detail"]


def test_unauthorised_calls_get_401(server, served) -> None:
    from cxr_embed.serve.keys import revoke_key

    rec = server["rec"]
    body = png_bytes(server["rows"][0]["path"])
    assert rec.client(server["url"], None).post("/v1/triage", content=body).status_code == 401
    assert rec.client(server["url"], "cxr_nope_nope").get("/v1/store").status_code == 401
    late = rec.client(server["url"], served["revoked"])
    assert late.get("/v1/store").status_code == 200
    revoke_key(served["keys"], served["revoked_id"])
    res = late.get("/v1/store")
    assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer"


def test_store_search_and_encode(server) -> None:
    api = server["api"]
    info = api.get("/v1/store").json()
    assert (
        info["rows"] == 40
        and [c["names"] for c in info["classifiers"]] == [["lr"]]
        and info["serving_classifier"]["name"] == "lr"
    )
    by_text = api.post("/v1/search", json={"text": "pleural effusion", "k": 3}).json()["results"][0]
    assert len(by_text["neighbors"]) == 3
    row = server["rows"][5]
    by_id = api.post("/v1/search", json={"image_id": row["image_id"], "k": 3}).json()["results"][0]
    assert all(n["patient_id"] != row["patient_id"] for n in by_id["neighbors"])
    missing = api.post("/v1/search", json={"image_id": "no-such-image"})
    assert missing.status_code == 404 and "not in the store" in missing.json()["detail"]
    by_image = api.post("/v1/search", content=png_bytes(row["path"])).json()["results"][0]
    assert by_image["neighbors"][0]["image_id"] == row["image_id"] and "decisions" not in by_image
    texts = api.post("/v1/encode", json={"texts": ["normal chest", "cardiomegaly"]}).json()["results"]
    vec = np.asarray(texts[0]["embedding"])
    assert len(texts) == 2 and vec.shape == (32,) and abs(np.linalg.norm(vec) - 1) < 1e-4
    image = api.post("/v1/encode", content=png_bytes(row["path"])).json()["results"][0]
    assert np.allclose(image["embedding"], _stored_vector(server["store"], row["image_id"]), atol=1e-4)


def _stored_vector(store_path: Path, image_id: str) -> np.ndarray:
    from cxr_embed.retrieval import stored_queries
    from cxr_embed.store import Store

    return stored_queries(Store.open(store_path), [image_id])[0].vector


def test_limits(server) -> None:
    api = server["api"]
    assert (
        api.post("/v1/triage", params={"k": 1000}, content=png_bytes(server["rows"][0]["path"])).status_code
        == 422
    )
    huge = Image.new("L", (8000, 7000))
    buf = io.BytesIO()
    huge.save(buf, format="PNG")
    item = api.post("/v1/triage", content=buf.getvalue()).json()["results"][0]
    assert item["abstain"] and item["reason"]["code"] == "too-large"


def test_metrics_parse_as_prometheus_text(server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server['url']}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {
        "cxr_serve_requests",
        "cxr_serve_request_seconds",
        "cxr_serve_batch_size",
        "cxr_serve_errors",
        "cxr_serve_abstentions",
        "cxr_serve_store_rows",
    } <= set(families)
    triage_ok = [
        s
        for s in families["cxr_serve_requests"].samples
        if s.labels.get("endpoint") == "/v1/triage" and s.labels.get("status") == "200"
    ]
    assert triage_ok and triage_ok[0].value >= 5
    assert any(s.labels.get("code") == "out-of-scope" for s in families["cxr_serve_abstentions"].samples)


def test_new_rows_are_served_without_restart(server) -> None:
    from cxr_embed.store import Store, StoreWriter

    store = Store.open(server["store"])
    emb = store.embeddings()[:2]
    rows = [{"image_id": f"late_{i}.png", "patient_id": f"late{i}", "label": 1} for i in range(2)]
    with StoreWriter(
        store.path,
        model_id=store.model_id,
        checkpoint_sha256=store.checkpoint_sha256,
        preprocess_fingerprint=store.preprocess_fingerprint,
        dim=store.dim,
    ) as writer:
        writer.append(rows, emb)
        writer.finalize()
    deadline = time.monotonic() + 15
    while server["api"].get("/v1/store").json()["rows"] != 42:
        assert time.monotonic() < deadline, "the server did not pick up the new rows"
        time.sleep(0.5)
    hit = server["api"].post(
        "/v1/search", json={"image_id": "late_1.png", "k": 2, "exclude_same_patient": False}
    )
    top = hit.json()["results"][0]["neighbors"]  # late_1 duplicates row 1's vector: the two tie at the top
    assert (
        hit.status_code == 200
        and "late_1.png" in {n["image_id"] for n in top}
        and top[0]["similarity"] > 0.999
    )


def test_dicom_c_store_is_triaged_and_audited(server) -> None:
    """A modality pushes a chest CR and a CT over DICOM; both are processed, the CT abstains (in the audit)."""
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage

    px = gray_pixels(server["rows"][4]["path"])
    ae = AE(ae_title="TEST-MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server["dicom_port"], ae_title="CXR-EMBED")
    assert assoc.is_established
    statuses = []
    for modality, sop_class in (("CR", ComputedRadiographyImageStorage), ("CT", CTImageStorage)):
        ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(px, modality=modality)))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        statuses.append(assoc.send_c_store(ds).Status)
        server["rec"].calls.append(("dicom:c-store", 200))
    assoc.release()
    assert statuses == [0, 0]


def test_case_lookup_page_in_headless_chromium(server, tmp_path_factory) -> None:
    """Upload an image through the page's form in a real browser; the result table and thumbnails show."""
    import shutil as sh

    from serve_helpers import Chromium

    binary = sh.which("chromium") or sh.which("chromium-browser") or sh.which("google-chrome")
    if binary is None:
        pytest.skip("no chromium on PATH (apt-get install chromium): the page was not exercised in a browser")
    out = tmp_path_factory.mktemp("page")
    browser = Chromium(binary, out / "profile")
    try:
        browser.navigate(server["url"] + "/")
        assert browser.evaluate("document.querySelector('h1').textContent") == "cxr-embed case lookup"
        browser.evaluate(f"document.querySelector('input[name=key]').value = {server['good']!r}")
        browser.set_file("#file", Path(server["rows"][3]["path"]))
        browser.click_and_wait("#go")
        server["rec"].calls.append(("/lookup", 200))  # the browser's POST /lookup is audited too
        verdict = browser.evaluate("document.getElementById('verdict').textContent")
        assert verdict.startswith("Probability of abnormal"), verdict
        assert browser.evaluate("document.querySelectorAll('#neighbors tr.neighbor').length") == K
        assert (
            browser.evaluate("document.querySelectorAll('#neighbors img').length") == K
        )  # --link-file thumbnails
        shot = browser.screenshot(Path(os.environ.get("CXR_EMBED_TEST_ARTIFACTS", out)) / "case_lookup.png")
    finally:
        browser.close()
    assert Image.open(shot).size[0] >= 800
    print(f"screenshot: {shot}")


def test_audit_has_one_row_per_call_and_no_canary_anywhere(server) -> None:
    from cxr_embed.sql import run_query
    from cxr_embed.store import Store

    rc = server["proc"].stop()  # graceful: flushes the audit buffer
    assert rc == 0, server["log"].read_text()
    audit = run_query(Store.open(server["store"]), "SELECT * FROM audit ORDER BY time").to_pylist()
    assert Counter((r["endpoint"], r["status"]) for r in audit) == Counter(server["rec"].calls)
    assert all(r["key_id"] is None for r in audit if r["status"] == 401)
    triage = [r for r in audit if r["endpoint"] == "/v1/triage" and r["status"] == 200]
    assert all(r["model_id"] == "cxr-embed-tiny-parity-fixture" and r["classifier"] == "lr" for r in triage)
    assert all(len(r["checkpoint_sha256"]) == 64 and json.loads(r["thresholds"]) for r in triage)
    assert any(r["decision"] and "abstain:out-of-scope" in r["decision"] for r in triage)
    assert any(r["input_kind"] == "dicom" for r in triage) and all(r["latency_ms"] > 0 for r in audit)
    pushed = [r for r in audit if r["endpoint"] == "dicom:c-store"]
    assert [r["key_id"] for r in pushed] == ["ae:TEST-MODALITY"] * 2
    assert "abstain" not in pushed[0]["decision"] and pushed[1]["decision"] == "abstain:out-of-scope"
    # no identifier from an uploaded DICOM in any response, in the log, or in any file of the store
    haystacks = {"responses": b"\n".join(server["rec"].bodies), "log": server["log"].read_bytes()}
    for f in Path(server["store"]).rglob("*"):
        if f.is_file():
            haystacks[str(f)] = f.read_bytes()
    for where, data in haystacks.items():
        for canary in CANARIES:
            assert canary.encode() not in data, f"{canary} leaked into {where}"
    assert b"Traceback" not in haystacks["log"]


def test_keys_file_holds_only_salted_hashes_with_mode_0600(served) -> None:
    from cxr_embed.serve.keys import read_keys

    path = served["keys"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert served["good"].split("_", 2)[2] not in text
    assert [k.active for k in read_keys(path)] == [True, False]


def test_non_loopback_without_keys_is_refused(served) -> None:
    from cxr_embed_cli.main import app
    from typer.testing import CliRunner

    from cxr_embed.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="Refusing"):
        ServeConfig(store=served["store"], host="0.0.0.0").check()
    res = CliRunner().invoke(app, ["serve", "--store", str(served["store"]), "--host", "10.1.2.3"])
    assert res.exit_code == 1 and "Refusing to listen on 10.1.2.3" in res.stderr
    ServeConfig(store=served["store"], host="::1").check()  # loopback is fine


def test_keys_cli_add_list_revoke(tmp_path) -> None:
    from cxr_embed_cli.main import app
    from typer.testing import CliRunner

    keys = tmp_path / "k.json"
    runner = CliRunner()
    added = runner.invoke(app, ["serve", "keys", "add", "--keys", str(keys), "--label", "pacs", "--json"])
    assert added.exit_code == 0, added.output
    key_id = json.loads(added.stdout)["id"]
    assert runner.invoke(app, ["serve", "keys", "revoke", key_id, "--keys", str(keys)]).exit_code == 0
    listed = json.loads(runner.invoke(app, ["serve", "keys", "list", "--keys", str(keys), "--json"]).stdout)
    assert listed[0]["id"] == key_id and listed[0]["status"] == "revoked" and "hash" not in listed[0]
    bad = runner.invoke(app, ["serve", "keys", "revoke", "nope", "--keys", str(keys)])
    assert bad.exit_code == 1 and "No key 'nope'" in bad.stderr
