"""CLI commands: ``index`` (the main job) and ``store info`` / ``store validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import (
    EXIT_CODES_HELP,
    EXIT_PARTIAL,
    DeviceOpt,
    FormatOpt,
    JsonOpt,
    ModelDirOpt,
    OutOpt,
    PrecisionOpt,
    QuietOpt,
    StoreOpt,
    WideOpt,
    emit_record,
    emit_rows,
    handle_errors,
    info,
    resolve_output,
    warn,
)
from cxr_embed_cli.reader_opts import with_reader_options

store_app = typer.Typer(help="Inspect and check an embedding store.", no_args_is_help=True)


@handle_errors
@with_reader_options
def index_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="Dataset: a ChestX-ray14 folder (or its Data_Entry CSV), an image folder or a DICOM folder."
        ),
    ],
    store: StoreOpt,
    dataset: Annotated[str, typer.Option("--dataset", help="auto, chestxray14, folder or dicom.")] = "auto",
    model_dir: ModelDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            help="Decode worker processes (0: in the main process). Default: most cores on GPU, a few on CPU.",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=0, help="Only the first N images of the dataset listing.")
    ] = None,
    shard_size: Annotated[
        int,
        typer.Option(
            "--shard-size", min=1, help="Rows per committed Parquet shard (the unit of crash safety)."
        ),
    ] = 4096,
    index: Annotated[
        str | None,
        typer.Option(
            "--index",
            help="FAISS index: flat (exact), ivf, hnsw, ivfpq or auto (flat, IVF above 250k rows). Default: auto for a new store, else the store's current choice.",
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="local (DataLoader workers + one device) or ray (a cluster).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="--engine ray: cluster address (auto, host:6379 or ray://host:10001). Default: $RAY_ADDRESS, else a new local Ray.",
        ),
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(
            "--gpus-per-worker",
            min=0,
            help="--engine ray: GPUs per model actor (default 1 when the cluster has GPUs).",
        ),
    ] = None,
    cpus_per_worker: Annotated[
        float,
        typer.Option("--cpus-per-worker", min=0.01, help="--engine ray: CPUs per decode task / model actor."),
    ] = 1.0,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Remove stored rows whose image the source no longer lists (default: only report them).",
        ),
    ] = False,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
    quiet: QuietOpt = False,
    reader_options: dict | None = None,
    link_file: Path | None = None,
) -> None:
    """Embed a dataset into a store (Parquet shards + FAISS index); rerun to resume or add new images.

    Only images the store does not hold yet are embedded, so rerunning the same command after a
    crash or kill finishes the job, and rerunning after adding images appends them. Unreadable
    images are recorded in errors.parquet and skipped. A store made with another model or
    preprocessing is refused. DICOM folders are de-identified (keyed pseudonyms, no path, no date)
    and only chest radiographs are taken: see the "Reading the dataset" options.
    """
    from cxr_embed.job import IndexConfig, run_index

    config = IndexConfig(
        dataset=dataset,
        model_dir=model_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        limit=limit,
        shard_size=shard_size,
        index=index,
        engine=engine,
        ray_address=address,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        prune=prune,
        reader_options=reader_options or {},
        link_file=link_file,
    )
    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    summary = run_index(source, store, config, progress=not quiet)  # an empty source: InputError, no store
    emit_record(
        summary,
        [
            ("store", summary.store),
            ("listed", summary.listed),
            ("stored", summary.stored),
            ("already stored", summary.already_stored),
            ("embedded", summary.embedded),
            ("failed", summary.failed),
            *(
                (f"failed.{stage}", n)
                for stage, n in sorted(summary.failures_by_stage.items())
                if stage not in summary.skipped
            ),
            ("skipped", sum(summary.skipped.values())),
            *((f"skipped.{reason}", n) for reason, n in summary.skipped.items()),
            ("updated", summary.updated),
            ("missing from source", summary.missing_from_source),
            ("pruned", summary.pruned),
            ("rows in store", summary.rows),
            ("index", summary.index_kind),
            ("images/s", summary.images_per_s),
            ("seconds", summary.seconds),
            ("model", f"{summary.model_id} on {summary.device} ({summary.precision})"),
        ],
        spec,
        title="cxr-embed index: listed = stored + failed + skipped",
    )
    for note in summary.notes:
        info(note)
    if not summary.balanced:
        warn(
            f"listed {summary.listed} != stored {summary.stored} + failed {summary.failed} + skipped "
            f"{sum(summary.skipped.values())}: please report this (an input went missing from the accounting)."
        )
    if summary.failed:
        if not quiet:
            info(
                f'{summary.failed} input(s) failed; see `cxr-embed sql --store {summary.store} "SELECT * FROM errors"`.'
            )
        raise typer.Exit(EXIT_PARTIAL)


@store_app.command("info")
@handle_errors
def info_cmd(
    store: StoreOpt,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Counts, model identity, index kind and an errors summary of a store."""
    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    from cxr_embed.store import store_info

    details = store_info(store)
    rows = [
        ("path", details.path),
        ("model_id", details.model_id),
        ("model_dir", details.model_dir),
        ("checkpoint_sha256", details.checkpoint_sha256),
        ("preprocess_fingerprint", details.preprocess_fingerprint),
        ("dim", details.dim),
        ("rows", details.rows),
        ("patients", details.patients),
        ("labels", details.labels),
        ("splits", details.splits),
        ("shards", details.shards),
        ("index", details.index_kind),
        ("index_vectors", details.index_rows),
        ("index_params", details.index_params),
        ("errors", details.errors),
        ("errors_by_stage", details.errors_by_stage),
        ("size_mb", details.size_mb),
        ("updated_at", details.updated_at),
    ]
    emit_record(details, rows, spec, title="cxr-embed store")


@store_app.command("validate", epilog="Exit codes: 0 every check passed; 1 a check failed or an error.")
@handle_errors
def validate_cmd(
    store: StoreOpt,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Check shards, row_ids, model identity and that the FAISS index holds exactly the Parquet vectors.

    Exits 1 when a check fails (warnings, such as orphan shards a killed run left, do not fail).
    --format json prints the whole report; the other formats one row per check.
    """
    from cxr_embed.errors import StoreDamagedError

    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    from cxr_embed.store import validate_store

    report = validate_store(store)
    if spec.fmt == "json":
        emit_record(
            {"path": report.path, "ok": report.ok, "rows": report.rows, "checks": report.checks}, [], spec
        )
    else:
        emit_rows(
            [{"check": c.name, "status": c.status, "detail": c.detail} for c in report.checks],
            spec,
            columns=("check", "status", "detail"),
            title=f"{report.path}: {'OK' if report.ok else 'FAILED'}",
        )
        for problem in report.problems:
            typer.echo(f"{problem.status.upper()}: {problem.name}: {problem.detail}. To fix: {problem.fix}.")
    if spec.fmt != "table":
        info(f"{report.path}: {'OK' if report.ok else 'FAILED'}")
    if not report.ok:
        failed = sum(c.status == "fail" for c in report.problems)
        raise StoreDamagedError(
            f"store {report.path} failed {failed} check(s); see the lines above for what to do."
        )


def register(app: typer.Typer) -> None:
    """Add ``index`` and the ``store`` group to ``app``."""
    from cxr_embed_cli import store_cmds

    store_cmds.register(store_app)
    app.command("index", epilog=EXIT_CODES_HELP)(index_cmd)
    app.add_typer(store_app, name="store")
