"""What the routes, the page and the DICOM receiver share: the :class:`Service` and the triage answer.

``triage_decoded`` is the one path from decoded inputs to answers: micro-batched model work, the
distance gate, the classifier's operating points, abstentions, metrics and the audit record's
outcome. Its JSON shape is the API's (see the README's serving section).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from cxr_embed.readers.deid import IdKey
from cxr_embed.serve.audit import AuditLog, AuditRecord
from cxr_embed.serve.batching import MicroBatcher
from cxr_embed.serve.config import ServeConfig
from cxr_embed.serve.engine import Engine, ImageAnswer, ImageQuery
from cxr_embed.serve.keys import KeyRing
from cxr_embed.serve.metrics import ServeMetrics
from cxr_embed.serve.scope import DecodedUpload, decode_upload
from cxr_embed.serve.uploads import Upload


@dataclass
class Service:
    """Everything the routes share (one per app)."""

    config: ServeConfig
    engine: Engine
    batcher: MicroBatcher[ImageQuery, ImageAnswer]
    audit: AuditLog
    metrics: ServeMetrics
    keys: KeyRing | None
    key: IdKey  # the store's de-identification key (pseudonyms of DICOM uploads)

    def new_record(self, endpoint: str) -> AuditRecord:
        """An audit record carrying what every answer depends on: model and classifier identity."""
        rec = AuditRecord(endpoint=endpoint, model_id=self.engine.model.model_id,
                          checkpoint_sha256=self.engine.model.checkpoint_sha256)  # fmt: skip
        clf = self.engine.classifier
        if clf is not None:
            rec.classifier, rec.classifier_run, rec.classifier_sha256 = clf.name, clf.run_id, clf.sha256
            rec.thresholds = clf.thresholds
        return rec

    def authenticate(self, token: str | None) -> str:
        """The key id; 401 unless ``token`` is an active key (or the server runs keyless on loopback)."""
        if self.keys is None:
            return "none"
        key_id = self.keys.verify(token)
        if key_id is None:
            raise HTTPException(
                401,
                "Missing, unknown or revoked API key: send 'Authorization: Bearer <key>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return key_id

    async def decode_async(self, uploads: list[Upload]) -> list[tuple[DecodedUpload, Any]]:
        """:meth:`decode` on the engine's bounded decode pool (not Starlette's 40 threads: concurrent
        torch preprocessing in that many threads oversubscribes the cores the model needs)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.engine.decode_executor, self.decode, uploads
        )

    def decode(self, uploads: list[Upload]) -> list[tuple[DecodedUpload, Any]]:
        """Decode + scope-check + preprocess each upload (runs in the thread pool)."""
        out = []
        for up in uploads:
            dec = decode_upload(up.data, up.content_type, max_pixels=self.config.max_pixels, key=self.key)
            out.append((dec, None if dec.image is None else self.engine.model.preprocessor(dec.image)))
        return out

    async def answer(
        self, decoded: list[tuple[DecodedUpload, Any]], k: int, patient: str | None
    ) -> list[ImageAnswer | None]:
        """Micro-batched answers for the decodable inputs (None for the rest), within the request timeout."""
        queries = [ImageQuery(t, k, d.patient or patient) for d, t in decoded if t is not None]
        try:
            answers = (
                await asyncio.wait_for(self.batcher.submit(queries), self.config.timeout_s) if queries else []
            )
        except asyncio.TimeoutError:
            raise HTTPException(
                504,
                f"The model did not answer within {self.config.timeout_s:g} s; the server is "
                "overloaded, retry later.",
            ) from None
        it = iter(answers)
        return [next(it) if t is not None else None for _, t in decoded]


def neighbor_json(n: Any) -> dict[str, Any]:
    """A neighbour as the API shows it: pseudonymous ids, never the stored file path."""
    return {
        "rank": n.rank,
        "image_id": n.image_id,
        "patient_id": n.patient_id,
        "similarity": round(n.similarity, 6),
        "label": n.label,
        "findings": list(n.findings) if n.findings is not None else None,
        "view": n.view,
    }


def triage_item(svc: Service, index: int, dec: DecodedUpload, ans: ImageAnswer | None) -> dict[str, Any]:
    """One file's answer: probability and decisions, or ``abstain`` with a reason; neighbours either way."""
    item: dict[str, Any] = {
        "index": index,
        "input": {"kind": dec.kind, "bytes": dec.size},
        "query_id": dec.query_id,
        "patient_excluded": False,
        "abstain": False,
        "reason": None,
        "probability": None,
        "probability_source": None,
        "decisions": {},
        "nearest_similarity": None,
        "neighbors": [],
    }
    if dec.abstention is not None or ans is None:
        reason = dec.abstention
        item.update(abstain=True, reason={"code": reason.code, "detail": reason.detail} if reason else None)
        return item
    result = ans.neighbors
    neighbors = result.neighbors if result is not None else []
    nearest = neighbors[0].similarity if neighbors else None
    item.update(
        neighbors=[neighbor_json(n) for n in neighbors],
        nearest_similarity=nearest,
        patient_excluded=result is not None and result.excluded_patient is not None,
    )
    gate = svc.engine.gate
    if not gate.allows(nearest):
        shown = "none" if nearest is None else f"{nearest:.3f}"
        item.update(
            abstain=True,
            reason={
                "code": "out-of-distribution",
                "detail": (
                    f"the most similar stored case has similarity {shown}, below this store's threshold {gate.threshold:.3f} "
                    f"(the {gate.percentile:g}th percentile of stored cases' similarity to their nearest other-patient case)"
                ),
            },
        )
        return item
    clf = svc.engine.classifier
    if clf is not None:
        item.update(
            probability=ans.probability,
            probability_source="classifier",
            decisions={name: bool(ans.probability >= thr) for name, thr in clf.thresholds.items()},
        )
    elif result is not None:
        item.update(probability=result.probability_abnormal, probability_source="knn-vote")
    return item


def decision_summary(item: dict[str, Any]) -> str:
    if item["abstain"]:
        return f"abstain:{(item['reason'] or {}).get('code', 'unknown')}"
    if item["decisions"]:
        return ",".join(f"{k}:{'abnormal' if v else 'normal'}" for k, v in sorted(item["decisions"].items()))
    p = item["probability"]
    return "knn:n/a" if p is None else f"knn:{p:.3f}"


def note_inputs(rec: AuditRecord, decoded: list[tuple[DecodedUpload, Any]]) -> None:
    rec.inputs = len(decoded)
    rec.input_bytes = sum(d.size for d, _ in decoded)
    rec.input_kind = ",".join(sorted({d.kind for d, _ in decoded})) or None


async def triage_uploads(
    svc: Service, rec: AuditRecord, uploads: list[Upload], k: int, patient: str | None
) -> list[dict]:
    """The triage pipeline shared by ``POST /v1/triage`` and the page."""
    decoded = await svc.decode_async(uploads)
    return await triage_decoded(svc, rec, decoded, k, patient)


async def triage_decoded(
    svc: Service, rec: AuditRecord, decoded: list[tuple[DecodedUpload, Any]], k: int, patient: str | None
) -> list[dict]:
    """Answers for decoded inputs (also the DICOM receiver's path); fills the audit record's outcome."""
    note_inputs(rec, decoded)
    answers = await svc.answer(decoded, k, patient)
    items = [triage_item(svc, i, d, a) for i, ((d, _), a) in enumerate(zip(decoded, answers, strict=True))]
    for item in items:
        if item["abstain"]:
            svc.metrics.abstentions.labels((item["reason"] or {}).get("code", "unknown")).inc()
    rec.abstained = sum(item["abstain"] for item in items)
    rec.decision = ";".join(decision_summary(i) for i in items)
    return items
