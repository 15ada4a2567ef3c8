"""The FastAPI app: routes, authentication, audit and metrics around one :class:`Engine`.

Request path of a triage call: authenticate (bearer key) -> read the body within limits -> decode
and scope-check each file (thread pool) -> preprocess -> micro-batch (model thread: embed, classify,
search) -> answer per file, abstaining with a reason where the input is out of scope, undecodable
or too far from every stored case -> one audit row and the metrics, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from cxr_embed.errors import CxrEmbedError, QueryError
from cxr_embed.serve.audit import AuditLog
from cxr_embed.serve.batching import BatchConfig, MicroBatcher
from cxr_embed.serve.config import ServeConfig, batch_size_for
from cxr_embed.serve.engine import Engine, ImageAnswer, ImageQuery
from cxr_embed.serve.keys import KeyRing
from cxr_embed.serve.metrics import make_metrics
from cxr_embed.serve.scope import store_key
from cxr_embed.serve.service import Service, neighbor_json, note_inputs, triage_uploads
from cxr_embed.serve.uploads import Upload, read_body, read_uploads

log = logging.getLogger("cxr_embed.serve")

ROUTES = (
    "/v1/triage",
    "/v1/search",
    "/v1/encode",
    "/v1/store",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "/lookup",
)
AUDITED = ("/v1/", "/lookup")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _service(request: Request) -> Service:
    return request.app.state.service


def require_key(request: Request) -> str:
    """FastAPI dependency of every /v1 route: authenticate and note the key id for the audit."""
    key_id = _service(request).authenticate(_bearer(request))
    request.state.audit.key_id = key_id
    return key_id


def _k(svc: Service, k: int | None) -> int:
    k = svc.config.k if k is None else k
    if not 1 <= k <= svc.config.max_k:
        raise HTTPException(422, f"k must be between 1 and {svc.config.max_k} (got {k}).")
    return k


def create_app(config: ServeConfig, *, engine: Engine | None = None) -> FastAPI:
    """A ready app: loads the store, model and classifier now (so start-up errors surface before serving)."""
    config.check()
    engine = engine or Engine(config)
    metrics = make_metrics()
    batcher: MicroBatcher[ImageQuery, ImageAnswer] = MicroBatcher(
        engine.run_images,
        BatchConfig(batch_size_for(config, engine.model.device.type), config.max_wait_ms),
        engine.executor,
        on_batch=lambda n, s: (metrics.batch_size.observe(n), metrics.batch_seconds.observe(s)),
    )
    svc = Service(
        config,
        engine,
        batcher,
        AuditLog(engine.store),
        metrics,
        KeyRing(config.keys) if config.keys is not None else None,
        store_key(engine.store, config.key_file),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        flusher = asyncio.create_task(_flush_every(svc.audit, config.audit_flush_seconds))
        receiver = None
        if config.dicom_port is not None:
            from cxr_embed.serve.dicom_port import DicomReceiver

            receiver = DicomReceiver(svc, asyncio.get_running_loop())
            await run_in_threadpool(receiver.start)
        try:
            yield
        finally:
            if receiver is not None:
                await run_in_threadpool(receiver.stop)
            flusher.cancel()
            await batcher.stop()
            await run_in_threadpool(svc.audit.flush)

    app = FastAPI(
        title="cxr-embed triage service",
        version="1",
        lifespan=lifespan,
        description="Chest X-ray triage, similar-case search and embeddings over a cxr-embed store.",
    )
    app.state.service = svc

    @app.middleware("http")
    async def audit_and_measure(request: Request, call_next: Any) -> Response:
        path = request.url.path
        rec = svc.new_record(path)
        request.state.audit = rec
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - a bug: logged without request data, answered without a traceback
            log.error("internal error on %s: %s", path, type(exc).__name__, exc_info=True)
            metrics.errors.labels("internal").inc()
            rec.error = rec.error or f"internal:{type(exc).__name__}"
            response = JSONResponse(
                {"detail": "Internal error; the server log has the details."}, status_code=500
            )
        elapsed = time.perf_counter() - start
        endpoint = path if path in ROUTES else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(elapsed)
        if path.startswith(AUDITED):
            rec.status, rec.latency_ms = response.status_code, elapsed * 1000
            if response.status_code >= 400:
                rec.error = rec.error or f"http{response.status_code}"
                metrics.errors.labels(f"http{response.status_code}").inc()
            if svc.audit.append(rec):
                await run_in_threadpool(svc.audit.flush)
        return response

    @app.exception_handler(CxrEmbedError)
    async def user_error(_: Request, exc: CxrEmbedError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404 if isinstance(exc, QueryError) else 400)

    _routes(app, svc)
    from cxr_embed.serve.page import add_page_routes

    add_page_routes(app, svc)
    return app


async def _flush_every(audit: AuditLog, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(audit.flush)
        except Exception:  # noqa: BLE001 - a full disk must not stop the service; the rows of this flush are lost, logged
            log.exception("audit flush failed")


def _routes(app: FastAPI, svc: Service) -> None:
    engine, config = svc.engine, svc.config

    def header() -> dict[str, Any]:
        return {
            "model": {"model_id": engine.model.model_id, "checkpoint_sha256": engine.model.checkpoint_sha256},
            "classifier": engine.classifier.describe() if engine.classifier else None,
            "distance_gate": engine.gate.describe(),
            "store_rows": len(engine.store),
        }

    async def uploads_of(request: Request) -> tuple[list[Upload], dict[str, str]]:
        files, fields = await read_uploads(request, max_bytes=config.max_bytes, max_files=config.max_files)
        if not files:
            raise HTTPException(
                400,
                "No image in the request: send one file as the body (application/dicom, "
                "image/png, image/jpeg) or several as multipart/form-data.",
            )
        return files, fields

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers (no authentication)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Readiness: model loaded, store open, batcher running."""
        ready = svc.batcher.running
        return JSONResponse({"ready": ready, "rows": len(engine.store)}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics_text() -> Response:
        """Prometheus text format."""
        svc.metrics.store_rows.set(len(engine.store))
        return Response(svc.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/store", tags=["api"])
    async def store_info(request: Request, _: str = Depends(require_key)) -> dict[str, Any]:
        """The model, row count, saved classifiers and the distance gate answers come from."""
        request.state.audit.input_kind = "none"
        return await run_in_threadpool(engine.describe)

    @app.post("/v1/triage", tags=["api"])
    async def triage(
        request: Request, k: int | None = None, patient_id: str | None = None, _: str = Depends(require_key)
    ) -> dict[str, Any]:
        """Probability of abnormal, decision at each operating point and the k most similar stored cases per image.

        Body: one file (``application/dicom``, ``image/png``, ``image/jpeg``) or ``multipart/form-data`` with
        several. ``patient_id``: the store's (pseudonymous) patient id of the query, to exclude that patient's
        images from the neighbours; a DICOM's own Patient ID is pseudonymised and used automatically.
        """
        files, fields = await uploads_of(request)
        items = await triage_uploads(
            svc, request.state.audit, files, _k(svc, k), patient_id or fields.get("patient_id")
        )
        return {**header(), "results": items}

    @app.post("/v1/search", tags=["api"])
    async def search(request: Request, k: int | None = None, _: str = Depends(require_key)) -> dict[str, Any]:
        """Similar stored cases by text (``{"text": ...}``), stored id (``{"image_id": ...}``) or an image body."""
        rec = request.state.audit
        if request.headers.get("content-type", "").startswith("application/json"):
            query = await _json(request, config.max_bytes)
            kk = _k(svc, query.get("k", k))
            rec.inputs = 1
            if isinstance(query.get("text"), str) and query["text"].strip():
                rec.input_kind = "text"
                result = (await _in_model_thread(engine.search_texts, [query["text"]], kk))[0]
            elif isinstance(query.get("image_id"), str):
                rec.input_kind = "image_id"
                exclude = bool(query.get("exclude_same_patient", True))
                result = (await _in_model_thread(engine.search_ids, [query["image_id"]], kk, exclude))[0]
            else:
                raise HTTPException(422, 'Give {"text": "..."} or {"image_id": "..."} (or send an image).')
            rec.decision = (
                "knn:n/a" if result.probability_abnormal is None else f"knn:{result.probability_abnormal:.3f}"
            )
            return {
                **header(),
                "results": [
                    {
                        "index": 0,
                        "abstain": False,
                        "neighbors": [neighbor_json(n) for n in result.neighbors],
                        "knn_probability": result.probability_abnormal,
                    }
                ],
            }
        files, fields = await uploads_of(request)
        items = await triage_uploads(svc, rec, files, _k(svc, k), fields.get("patient_id"))
        for item in items:
            item["knn_probability"] = (
                item.pop("probability") if item.pop("probability_source") == "knn-vote" else None
            )
            item.pop("decisions")
        return {**header(), "results": items}

    @app.post("/v1/encode", tags=["api"])
    async def encode(request: Request, _: str = Depends(require_key)) -> dict[str, Any]:
        """Embeddings (unit-norm, the store's model): ``{"texts": [...]}`` or image files."""
        rec = request.state.audit
        if request.headers.get("content-type", "").startswith("application/json"):
            texts = (await _json(request, config.max_bytes)).get("texts")
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise HTTPException(422, 'Give {"texts": ["...", ...]} (or send images).')
            rec.input_kind, rec.inputs = "text", len(texts)
            vectors = await _in_model_thread(engine.encode_texts, texts)
            return {
                **header(),
                "results": [
                    {"index": i, "abstain": False, "embedding": v.tolist()} for i, v in enumerate(vectors)
                ],
            }
        files, _fields = await uploads_of(request)
        decoded = await svc.decode_async(files)
        note_inputs(rec, decoded)
        answers = await svc.answer(decoded, 0, None)
        out = []
        for i, ((dec, _), ans) in enumerate(zip(decoded, answers, strict=True)):
            reason = dec.abstention
            out.append(
                {
                    "index": i,
                    "abstain": ans is None,
                    "input": {"kind": dec.kind, "bytes": dec.size},
                    "reason": {"code": reason.code, "detail": reason.detail} if reason else None,
                    "embedding": None if ans is None else ans.vector.tolist(),
                }
            )
        rec.abstained = sum(o["abstain"] for o in out)
        return {**header(), "results": out}

    async def _in_model_thread(fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(engine.executor, fn, *args), config.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"No answer within {config.timeout_s:g} s; retry later.") from None


async def _json(request: Request, limit: int) -> dict[str, Any]:
    import json

    try:
        doc = json.loads(await read_body(request, limit) or b"{}")
    except ValueError:
        raise HTTPException(400, "The body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise HTTPException(422, "The JSON body must be an object.")
    return doc


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` worker processes (``--workers N``): settings from the environment."""
    import os

    from cxr_embed.serve.config import CONFIG_ENV

    return create_app(ServeConfig.from_json(os.environ[CONFIG_ENV]))
