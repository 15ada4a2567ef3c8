"""CLI command: search — similar cases by image file, stored image id, or text."""

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
    WideOpt,
    emit_record,
    emit_rows,
    handle_errors,
    info,
    resolve_output,
)

_COLUMNS = (
    "rank",
    "similarity",
    "image_id",
    "patient_id",
    "label",
    "findings",
    "view",
    "sex",
    "age",
    "split",
)
"""Table columns; the other formats add each neighbour's path and row_id, and JSON is the whole result."""
_FILE_COLUMNS = (*_COLUMNS, "row_id", "path")


def search(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option("--store", "-s", help="Store directory or file:// URI (made by `cxr-embed index`).",
                     envvar="CXR_EMBED_STORE"),
    ] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Query with this X-ray file (PNG/JPEG/DICOM).")
    ] = None,
    image_id: Annotated[
        str | None, typer.Option("--id", help="Query with the stored vector of this image_id.")
    ] = None,
    text: Annotated[
        str | None, typer.Option("--text", help='Query with a text description, e.g. "pleural effusion".')
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of neighbours to return.")] = 10,
    where: Annotated[
        str | None,
        typer.Option(
            "--where",
            help="SQL condition on image metadata (columns of the `images` view), applied BEFORE ranking "
            "so k results still come back, e.g. \"view = 'PA' AND age >= 60\".",
        ),
    ] = None,
    exclude_same_patient: Annotated[
        bool,
        typer.Option(
            "--exclude-same-patient",
            help="Also drop the other images of the query's patient (known from the store, or from --patient-id); "
            "the query image itself is never returned.",
        ),
    ] = False,
    patient_id: Annotated[
        str | None, typer.Option("--patient-id", help="Patient of an --image query that is not in the store.")
    ] = None,
    link_file: Annotated[
        Path | None,
        typer.Option(
            "--link-file",
            help="The data owner's link file (written by `index --link-file` for DICOM): show each neighbour's "
            "file instead of its keyed reference. Nothing of it is written anywhere.",
        ),
    ] = None,
    model_dir: ModelDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    fmt: FormatOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Find the k most similar stored X-rays and a kNN-vote probability of abnormal.

    Exactly one of --image, --id or --text. An --image is embedded with the store's own model and
    preprocessing (refused if --model-dir holds a different checkpoint); --text uses the text tower.
    Similarity is cosine; the probability weights each labelled neighbour's vote by its similarity.
    A stored query image (--id, or an --image file that is in the store) is never its own neighbour,
    so its label never counts in the vote.
    --format json (or --json) prints the whole result; the other formats one row per neighbour.
    `cxr-embed search eval` measures how good the neighbours are (see `search eval --help`).
    """
    from cxr_embed.errors import ConfigError

    if ctx.invoked_subcommand is not None:  # `search eval …`: the sub-command has its own options
        return
    if store is None:
        raise ConfigError("Missing option --store (or $CXR_EMBED_STORE): the store to search.")

    spec = resolve_output(fmt, out, as_json=as_json, wide=wide)
    given = [name for name, v in (("--image", image), ("--id", image_id), ("--text", text)) if v is not None]
    if len(given) != 1:
        raise ConfigError('Give exactly one query: --image PATH, --id IMAGE_ID or --text "...".')
    if text is not None and exclude_same_patient:
        raise ConfigError("--exclude-same-patient needs an image query (--image or --id), not --text.")

    from cxr_embed import retrieval
    from cxr_embed.store import Store

    st = Store.open(store)
    if image_id is not None:
        result = retrieval.search_by_ids(st, [image_id], k, where, exclude_same_patient)[0]
    else:
        from cxr_embed.store import load_store_model

        model = load_store_model(st, model_dir, device=device, precision=precision)  # the store's model unless --model-dir
        if image is not None:
            pids = [patient_id] if patient_id is not None else None
            result = retrieval.search_by_images(st, model, [image], k, where, exclude_same_patient, pids)[0]
        else:
            result = retrieval.search_by_texts(st, model, [text], k, where)[0]

    if link_file is not None:
        from cxr_embed.listing import read_link_file

        try:
            result = result.with_files(read_link_file(link_file))
        except OSError as exc:
            raise ConfigError(f"Cannot read the link file {link_file}: {exc.strerror or exc}.") from None
    prob = (
        "n/a (no labelled neighbours)"
        if result.probability_abnormal is None
        else f"{result.probability_abnormal:.3f}"
    )
    if spec.fmt == "json":
        emit_record(result, [], spec)
        return
    import pyarrow as pa

    rows = pa.Table.from_pylist(
        [
            {**{c: getattr(n, c) for c in _FILE_COLUMNS}, "findings": ", ".join(n.findings or ())}
            for n in result.neighbors
        ]
    )
    if not rows.num_rows:  # nothing matched --where: still the same columns
        rows = pa.table({c: pa.array([], pa.string()) for c in _FILE_COLUMNS})
    else:  # similarities are float32: print them as such (0.9839, not 0.98390001…)
        rows = rows.set_column(
            rows.schema.get_field_index("similarity"), "similarity", rows["similarity"].cast(pa.float32())
        )
    if spec.fmt == "table":
        emit_rows(rows, spec, columns=_COLUMNS, title=f"{rows.num_rows} neighbours of {result.query}")
        typer.echo(f"kNN-vote probability of abnormal: {prob}")
    else:
        emit_rows(rows, spec, columns=_FILE_COLUMNS)
        info(f"kNN-vote probability of abnormal: {prob}")
    own = "" if result.excluded_row is None else " (the query image itself left out)"
    info(f"{result.candidates} candidate rows{own}, ranked by {result.strategy}")


def register(app: typer.Typer) -> None:
    """Add ``search`` (a query when called with options, a group for ``search eval``) to ``app``.

    Why a group: retrieval quality belongs next to retrieval. The group's ``--store`` is optional at
    parse time (checked in the body) so that ``search eval --store S`` reaches the sub-command.
    """
    from cxr_embed_cli import search_eval_cmds

    group = typer.Typer(no_args_is_help=False)
    group.callback(invoke_without_command=True)(handle_errors(search))
    search_eval_cmds.register(group)
    app.add_typer(group, name="search", help="Find the k most similar stored X-rays and a kNN-vote probability "
                  "of abnormal; `search eval` measures retrieval quality.")
