"""Arrow tables of the store: metadata normalisation, shard tables, embedding matrices, SQL helpers.

Pure functions over pyarrow/numpy (no I/O), shared by the reader, the writer and the rewrite paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cxr_embed.errors import StoreError
from cxr_embed.records import FINDINGS, ImageRecord
from cxr_embed.schema import IDENTITY_COLUMNS, METADATA_SCHEMA, shard_schema


def conform(data: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """``data`` with exactly ``schema``'s columns and types; StoreError naming what is wrong."""
    missing = [n for n in schema.names if n not in data.column_names]
    extra = [n for n in data.column_names if n not in schema.names]
    if missing or extra:
        raise StoreError(
            f"{what}: columns do not match the store schema (missing: {missing or 'none'}, unexpected: "
            f"{extra or 'none'}). Expected {schema.names}."
        )
    try:
        return data.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise StoreError(f"{what}: a column has the wrong type ({exc}).") from exc


def record_rows(records: Sequence[ImageRecord]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        row = dataclasses.asdict(rec)
        stored = row.pop("stored_path")
        if stored is not None:
            row["path"] = stored
        flags = row.pop("findings")
        row.update({name: (None if flags is None else int(flags[i])) for i, name in enumerate(FINDINGS)})
        rows.append(row)
    return rows


def metadata_table(metadata: pa.Table | Sequence[dict[str, Any]] | Sequence[ImageRecord]) -> pa.Table:
    """Normalise records / dict rows / an Arrow table into :data:`METADATA_SCHEMA` minus ``row_id``.

    Missing columns become nulls; a ``findings`` tuple (as in :class:`ImageRecord`) is spread into
    the 14 finding columns. ``image_id`` is required: it is how reruns know what is stored.
    """
    if not isinstance(metadata, pa.Table):
        rows = list(metadata)
        if rows and isinstance(rows[0], ImageRecord):
            rows = record_rows(rows)  # type: ignore[arg-type]
        elif any("findings" in r for r in rows):
            rows = record_rows([ImageRecord(**{k: r.get(k) for k in _RECORD_FIELDS}) for r in rows])
        names = {k for r in rows for k in r}
        metadata = (
            pa.table({k: [r.get(k) for r in rows] for k in sorted(names)})
            if rows
            else pa.table({"image_id": pa.array([], pa.string())})
        )
    n = metadata.num_rows
    if "image_id" not in metadata.column_names:
        raise StoreError("Store metadata needs an `image_id` column (a unique id per image).")
    columns = {}
    for f in METADATA_SCHEMA:
        if f.name == "row_id":
            continue
        col = metadata.column(f.name) if f.name in metadata.column_names else pa.nulls(n, f.type)
        try:
            columns[f.name] = col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(
                f"Store metadata column {f.name!r} cannot be stored as {f.type} ({exc})."
            ) from exc
    return pa.table(columns)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(ImageRecord))


def shard_table(
    meta: pa.Table, embeddings: np.ndarray, first_row_id: int, identity: dict[str, str]
) -> pa.Table:
    n, dim = embeddings.shape
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    columns = {
        "row_id": pa.array(np.arange(first_row_id, first_row_id + n, dtype=np.int64)),
        **{name: meta.column(name) for name in meta.column_names},
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        **{name: pa.array([identity[name]] * n, pa.string()) for name in IDENTITY_COLUMNS},
    }
    return pa.table(columns).cast(shard_schema(dim))


def embedding_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """A FixedSizeList<float32>[dim] column as an (n, dim) float32 C-contiguous array."""
    out = np.empty((len(column), dim), dtype=np.float32)
    pos = 0
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        out[pos : pos + len(chunk)] = values.reshape(len(chunk), dim)
        pos += len(chunk)
    return out


def sql_list(paths: Sequence[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def duck_type(t: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(t):
        return f"{duck_type(t.value_type)}[{t.list_size}]"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    simple = {
        pa.int64(): "BIGINT",
        pa.int32(): "INTEGER",
        pa.int16(): "SMALLINT",
        pa.int8(): "TINYINT",
        pa.string(): "VARCHAR",
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
        pa.bool_(): "BOOLEAN",
    }
    return simple[t]


def empty_select(schema: pa.Schema) -> str:
    cols = ", ".join(f'CAST(NULL AS {duck_type(f.type)}) AS "{f.name}"' for f in schema)
    return f"SELECT {cols} LIMIT 0"


def shard_bytes(table: pa.Table) -> bytes:
    """A shard (or any store table) serialised as Parquet in memory, so it can be hashed before it is written."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def parse_parquet(data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
    """A Parquet file's bytes (already verified) as a table; ArrowException when they do not parse."""
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns is not None else None)
