"""``--dicom-port``: a DICOM C-STORE receiver, so a PACS or modality can push images for triage.

Every received object goes through exactly the path of an upload: the chest-radiograph scope check,
pseudonymisation (only the HMAC ``query_id`` and the patient pseudonym survive), the micro-batcher,
the distance gate, and one audit row (endpoint ``dicom:c-store``, key id ``ae:<calling AE title>``).
The answer is logged by ``query_id`` and audited; nothing is stored, and the C-STORE status only
says whether the object was processed (0x0000) or not (0x0110, processing failure). Every storage
SOP class is accepted, so a CT pushed by mistake is recorded as out of scope rather than refused at
association. DICOM has no bearer keys: like the HTTP port, bind it to loopback or a trusted network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from cxr_embed.errors import DependencyError
from cxr_embed.serve.scope import decode_dataset

if TYPE_CHECKING:
    from cxr_embed.serve.service import Service

log = logging.getLogger("cxr_embed.serve")
AE_TITLE = "CXR-EMBED"
SUCCESS, PROCESSING_FAILURE = 0x0000, 0x0110


class DicomReceiver:
    """A pynetdicom storage SCP on ``config.host:config.dicom_port`` feeding the app's triage pipeline."""

    def __init__(self, svc: Service, loop: asyncio.AbstractEventLoop):
        self.svc = svc
        self.loop = loop
        self._server: Any = None

    def start(self) -> None:
        try:
            from pynetdicom import AE, AllStoragePresentationContexts, evt
        except ImportError:
            raise DependencyError("--dicom-port needs pynetdicom: pip install pynetdicom") from None
        ae = AE(ae_title=AE_TITLE)
        ae.supported_contexts = AllStoragePresentationContexts
        address = (self.svc.config.host, int(self.svc.config.dicom_port or 0))
        self._server = ae.start_server(address, block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        log.info("DICOM C-STORE receiver %s on %s:%d", AE_TITLE, *address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()

    def on_store(self, event: Any) -> int:
        """Triage one received object; never raises into pynetdicom."""
        from cxr_embed.serve.service import decision_summary, triage_decoded

        svc = self.svc
        rec = svc.new_record("dicom:c-store")
        rec.key_id = f"ae:{str(event.assoc.requestor.ae_title).strip()}"
        start = time.perf_counter()
        status = SUCCESS
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            size = len(event.request.DataSet.getvalue())
            dec = decode_dataset(ds, size, max_pixels=svc.config.max_pixels, key=svc.key)
            tensor = None if dec.image is None else svc.engine.model.preprocessor(dec.image)
            job = triage_decoded(svc, rec, [(dec, tensor)], svc.config.k, None)
            item = asyncio.run_coroutine_threadsafe(job, self.loop).result(svc.config.timeout_s + 5)[0]
            rec.status = 200
            log.info("C-STORE query %s: %s", item["query_id"], decision_summary(item))
        except Exception as exc:  # noqa: BLE001 - a bad object must not take the receiver down
            status, rec.status, rec.error = PROCESSING_FAILURE, 500, f"internal:{type(exc).__name__}"
            svc.metrics.errors.labels("dicom").inc()
            log.error("C-STORE processing failed: %s", type(exc).__name__)
        rec.latency_ms = (time.perf_counter() - start) * 1000
        svc.metrics.requests.labels("dicom:c-store", str(rec.status)).inc()
        svc.audit.append(rec)
        return status
