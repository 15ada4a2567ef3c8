"""``cxr-embed serve``: an authenticated HTTP triage / search / embedding service over one store.

Modules, in request order: :mod:`.config` (settings, the loopback rule), :mod:`.keys` (API keys as
salted hashes), :mod:`.uploads` (bodies within limits, multipart in memory), :mod:`.scope`
(decoding and the chest-radiograph scope check; pseudonyms only), :mod:`.batching` (micro-batches
for the model), :mod:`.engine` (store, model, classifier, distance gate), :mod:`.loaders` (the
store's model and saved classifiers, as ``predict`` loads them), :mod:`.audit` (the ``audit`` table),
:mod:`.metrics` (Prometheus), :mod:`.service` (the shared triage answer), :mod:`.app` (routes),
:mod:`.page` (the case-lookup page), :mod:`.dicom_port` (the optional C-STORE receiver) and
:mod:`.server` (uvicorn).
FastAPI and uvicorn come with the ``serve`` extra; nothing here is imported by the rest of cxr-embed.
"""
