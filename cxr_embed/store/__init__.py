"""The embedding store: one directory of Parquet shards, a FAISS index, errors and results.

Layout (see the README's index section)::

    store.json                        manifest (schema_version 2): identity (model, checkpoint sha256,
                                      preprocessing, dim, model folder), every committed file with its
                                      size and sha256, counts, index kind, audit records; replaced atomically
    embeddings/part-NNNNN.parquet     shards; row_id dense 0..N-1 across shards
    index/faiss-<token>.index         IndexIDMap2 whose ids are the row_ids
    errors-<token>.parquet            inputs that failed (image_id, path, stage, reason, run_at)
    results/<table>/part-*.parquet    predictions / metrics / runs appended by classify and finetune
    .lock                             the writer lock (flock)

Modules: :mod:`~cxr_embed.store.layout` (names, manifest, checksums), :mod:`~cxr_embed.store.tables`
(Arrow tables), :mod:`~cxr_embed.store.reader` (:class:`Store`), :mod:`~cxr_embed.store.lock`
(:class:`StoreLock`), :mod:`~cxr_embed.store.writer` (:class:`StoreWriter`),
:mod:`~cxr_embed.store.rewrite` (new shard versions),
:mod:`~cxr_embed.store.erase` (delete, compact), :mod:`~cxr_embed.store.info`,
:mod:`~cxr_embed.store.validate`, :mod:`~cxr_embed.store.migrate`, :mod:`~cxr_embed.store.model`.
"""

from __future__ import annotations

from cxr_embed.schema import ERRORS_SCHEMA, METADATA_SCHEMA, RESULT_SCHEMAS, shard_schema
from cxr_embed.store.erase import CompactResult, DeleteResult, compact_store, delete_rows
from cxr_embed.store.info import StoreInfo, store_info
from cxr_embed.store.layout import (
    CACHE_DIR,
    EMBEDDINGS_DIR,
    ERRORS_FILE,
    INDEX_DIR,
    INDEX_FILE,
    LOCK_FILE,
    MANIFEST,
    RESULTS_DIR,
    SCHEMA_VERSION,
    local_store_path,
    read_manifest,
)
from cxr_embed.store.lock import StoreLock
from cxr_embed.store.migrate import MigrateResult, migrate_store
from cxr_embed.store.model import load_store_model, recorded_model_dir, store_model_dir
from cxr_embed.store.reader import Store
from cxr_embed.store.tables import conform, embedding_matrix, metadata_table
from cxr_embed.store.validate import Check, ValidationReport, validate_store
from cxr_embed.store.writer import ReconcileResult, StoreWriter, build_store_from_arrays

__all__ = [
    "CACHE_DIR",
    "EMBEDDINGS_DIR",
    "ERRORS_FILE",
    "ERRORS_SCHEMA",
    "INDEX_DIR",
    "INDEX_FILE",
    "LOCK_FILE",
    "MANIFEST",
    "METADATA_SCHEMA",
    "RESULTS_DIR",
    "RESULT_SCHEMAS",
    "SCHEMA_VERSION",
    "Check",
    "CompactResult",
    "DeleteResult",
    "MigrateResult",
    "ReconcileResult",
    "Store",
    "StoreInfo",
    "StoreLock",
    "StoreWriter",
    "ValidationReport",
    "build_store_from_arrays",
    "compact_store",
    "conform",
    "delete_rows",
    "embedding_matrix",
    "load_store_model",
    "local_store_path",
    "metadata_table",
    "migrate_store",
    "read_manifest",
    "recorded_model_dir",
    "shard_schema",
    "store_info",
    "store_model_dir",
    "validate_store",
]
