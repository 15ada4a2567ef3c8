"""CLI commands of the store's life: ``store delete`` (erasure), ``store compact``, ``store migrate``."""

from __future__ import annotations

from typing import Annotated

import typer
from cxr_embed_cli.output import (
    FormatOpt,
    JsonOpt,
    OutOpt,
    StoreOpt,
    WideOpt,
    emit_record,
    handle_errors,
    info,
    resolve_output,
)


@handle_errors
def delete_cmd(
    store: StoreOpt,
    patient: Annotated[
        list[str] | None,
        typer.Option("--patient", help="Remove every image of this patient_id (repeatable)."),
    ] = None,
    image: Annotated[
        list[str] | None, typer.Option("--image", help="Remove this image_id (repeatable).")
    ] = None,
    where: Annotated[
        str | None,
        typer.Option("--where", help="Remove the rows matching this SQL condition on the images view."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Remove rows everywhere the store keeps them (shards, FAISS index, errors, result tables, caches).

    One atomic commit: a crash leaves the old or the new store. Remaining rows are renumbered so
    row_ids stay dense (image_id is the stable key; predictions follow it). The store keeps an audit
    record (when, how many, the kind of condition), never the identifiers.
    """
    from cxr_embed.store import delete_rows

    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    result = delete_rows(store, patients=patient or [], images=image or [], where=where, dry_run=dry_run)
    emit_record(
        result,
        [
            ("store", result.store),
            ("condition", result.condition),
            ("matched rows", result.matched_rows),
            ("matched patients", result.matched_patients),
            ("removed rows", result.removed_rows),
            ("rows left", result.rows_left),
        ],
        spec,
        title="cxr-embed store delete" + (" (dry run: nothing removed)" if result.dry_run else ""),
    )
    if result.removed_rows:
        info("Copies of the store made before this delete (backups, synced buckets) still hold the rows.")


@handle_errors
def compact_cmd(
    store: StoreOpt,
    target_rows: Annotated[
        int, typer.Option("--target-rows", min=1, help="Merge consecutive shards up to this many rows.")
    ] = 4096,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Merge small shards (left by many short index runs or deletes) into larger ones; rows and index unchanged."""
    from cxr_embed.store import compact_store

    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    result = compact_store(store, target_rows=target_rows)
    emit_record(
        result,
        [
            ("store", result.store),
            ("shards before", result.shards_before),
            ("shards after", result.shards_after),
            ("rows", result.rows),
        ],
        spec,
        title="cxr-embed store compact",
    )


@handle_errors
def migrate_cmd(
    store: StoreOpt,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Upgrade a store made by an older cxr-embed (schema version 1) in place: record every file's sha256."""
    from cxr_embed.store import migrate_store

    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    result = migrate_store(store)
    emit_record(
        result,
        [
            ("store", result.store),
            ("from version", result.from_version),
            ("to version", result.to_version),
            ("files hashed", result.files_hashed),
        ],
        spec,
        title="cxr-embed store migrate",
    )
    if result.files_hashed:
        info(f"Run `cxr-embed store validate --store {result.store}` to check the migrated store.")


def register(store_app: typer.Typer) -> None:
    """Add ``delete``, ``compact`` and ``migrate`` to the ``store`` group."""
    store_app.command("delete")(delete_cmd)
    store_app.command("compact")(compact_cmd)
    store_app.command("migrate")(migrate_cmd)
