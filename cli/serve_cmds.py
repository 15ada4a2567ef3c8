"""CLI commands: serve (the triage HTTP service) and serve keys add|list|revoke."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import (
    DeviceOpt,
    FormatOpt,
    JsonOpt,
    ModelDirOpt,
    OutOpt,
    PrecisionOpt,
    StoreOpt,
    WideOpt,
    emit_json,
    emit_rows,
    handle_errors,
    info,
    resolve_output,
)

KeysFileOpt = Annotated[Path, typer.Option("--keys", help="API key file (salted hashes only, mode 0600).")]

serve_app = typer.Typer(invoke_without_command=True, no_args_is_help=False)
keys_app = typer.Typer(help="Manage the API keys of `cxr-embed serve`.", no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")


@serve_app.callback()
@handle_errors
def serve(
    ctx: typer.Context,
    store: StoreOpt = "",  # optional here: `serve keys …` runs this callback without a store
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; anything but loopback needs --keys.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    classifier: Annotated[
        str | None,
        typer.Option(
            "--classifier",
            "-c",
            help="Saved classifier for triage (e.g. logreg); "
            "without one the probability is the neighbours' kNN vote.",
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run", help="Classify run whose --classifier file to serve (default: the latest run)."
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Server processes (each loads the model).")
    ] = 1,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    keys: Annotated[
        Path | None, typer.Option("--keys", help="API key file; every /v1 call then needs a Bearer key.")
    ] = None,
    model_dir: ModelDirOpt = None,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file",
            help="The de-identification key the store was indexed with (default: $CXR_EMBED_ID_SALT, then "
            "the user's key file): DICOM uploads get the store's pseudonyms, so their own patient is excluded.",
        ),
    ] = None,
    link_file: Annotated[
        Path | None, typer.Option("--link-file", help="CSV/Parquet image_id,path: thumbnails on the page.")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Default number of neighbours.")] = 5,
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch",
            min=1,
            help="Images per model forward (micro-batching); default 16 on a GPU, 1 on CPU.",
        ),
    ] = None,
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", min=0, help="How long a batch waits to fill.")
    ] = 5.0,
    max_mb: Annotated[float, typer.Option("--max-mb", min=0.001, help="Largest request body.")] = 64.0,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds a request may wait for the model.")
    ] = 30.0,
    ood_percentile: Annotated[
        float,
        typer.Option(
            "--ood-percentile",
            help="Abstain below this percentile of the store's own nearest-neighbour similarities.",
        ),
    ] = 1.0,
    dicom_port: Annotated[
        int | None,
        typer.Option("--dicom-port", help="Also receive DICOM C-STORE on this port (needs pynetdicom)."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve a store over HTTP: POST /v1/triage, /v1/search, /v1/encode; GET /v1/store, /healthz, /readyz,
    /metrics; the case-lookup page at /; OpenAPI docs at /docs.

    Binds to loopback by default; any other address is refused unless --keys names a key file
    (`cxr-embed serve keys add --keys FILE`). Every /v1 call is recorded in the store's `audit` table
    (`cxr-embed sql "SELECT * FROM audit"`); the server writes nothing else into the store.
    """
    if ctx.invoked_subcommand is not None:
        return
    from cxr_embed.errors import ConfigError
    from cxr_embed.serve.config import ServeConfig
    from cxr_embed.serve.server import run
    from cxr_embed.store import local_store_path

    if not store:
        raise ConfigError("Give the store to serve: cxr-embed serve --store DIR")
    config = ServeConfig(
        store=local_store_path(store),
        model_dir=model_dir,
        classifier=classifier,
        classifier_run=run_id,
        key_file=key_file,
        host=host,
        port=port,
        workers=workers,
        device=device,
        precision=precision,
        keys=keys,
        link_file=link_file,
        k=k,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_bytes=int(max_mb * 2**20),
        timeout_s=timeout,
        ood_percentile=ood_percentile,
        dicom_port=dicom_port,
    )
    config.check()
    info(
        f"serving {store} on http://{host}:{port} ({'API keys from ' + str(keys) if keys else 'no API keys: loopback only'})"
    )
    run(config, log_level=log_level)


@keys_app.command("add")
@handle_errors
def keys_add(
    keys: KeysFileOpt,
    label: Annotated[str, typer.Option("--label", help="Who or what the key is for.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Make a key; it is printed once (only its salted hash is kept)."""
    from cxr_embed.serve.keys import add_key

    entry, token = add_key(keys, label)
    if as_json:
        emit_json({"id": entry.id, "label": entry.label, "key": token, "created_at": entry.created_at})
        return
    typer.echo(token)
    info(f"key {entry.id} added to {keys}; store it now: it cannot be shown again.")


@keys_app.command("list")
@handle_errors
def keys_list(
    keys: KeysFileOpt,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The keys in the file (ids, labels, dates; never secrets)."""
    from cxr_embed.serve.keys import read_keys

    spec = resolve_output(fmt, out, as_json=as_json, wide=wide)
    rows = [
        {
            "id": k.id,
            "label": k.label,
            "created_at": k.created_at,
            "revoked_at": k.revoked_at,
            "status": "active" if k.active else "revoked",
        }
        for k in read_keys(keys)
    ]
    emit_rows(
        rows, spec, columns=("id", "label", "status", "created_at", "revoked_at"), title=f"API keys in {keys}"
    )


@keys_app.command("revoke")
@handle_errors
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (from `keys list`).")],
    keys: KeysFileOpt,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key; a running server refuses it within a second, no restart needed."""
    from cxr_embed.serve.keys import revoke_key

    entry = revoke_key(keys, key_id)
    if as_json:
        emit_json({"id": entry.id, "revoked_at": entry.revoked_at})
        return
    info(f"key {entry.id} revoked at {entry.revoked_at}")


def register(app: typer.Typer) -> None:
    """Add the serve group to ``app``."""
    app.add_typer(serve_app, name="serve")
