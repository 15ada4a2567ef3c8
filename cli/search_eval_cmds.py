"""CLI command: search eval — how good are the neighbours (P@k, mAP@k, nDCG@k, kNN-vote AUC)."""

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
    emit_rows,
    handle_errors,
    info,
    resolve_output,
)

_COLUMNS = ("index_kind", "target", "metric", "k", "value", "ci_low", "ci_high", "n_queries")


def parse_ks(text: str) -> tuple[int, ...]:
    """``"1,5,10"`` -> (1, 5, 10); ConfigError on anything else."""
    from cxr_embed.errors import ConfigError

    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise ConfigError(f"--k {text!r} must list positive integers, e.g. 1,5,10.") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"--k {text!r} must list positive integers, e.g. 1,5,10.")
    return ks


def search_eval(
    store: StoreOpt,
    plan: Annotated[
        str | None,
        typer.Option(
            "--plan",
            help="Stored evaluation plan: its test rows are the queries, its training rows "
            "the database (K folds: each fold against the others).",
        ),
    ] = None,
    k: Annotated[str, typer.Option("--k", "-k", help="Comma-separated cut-offs.")] = "1,5,10",
    label: Annotated[
        str, typer.Option("--label", help="abnormal | a finding (e.g. Effusion) | all-findings.")
    ] = "abnormal",
    where: Annotated[
        str | None, typer.Option("--where", help="SQL condition on `images` limiting queries and database.")
    ] = None,
    sample: Annotated[
        int | None, typer.Option("--sample", min=1, help="At most N queries (label-stratified, seeded).")
    ] = None,
    exact_only: Annotated[
        bool, typer.Option("--exact-only", help="Skip the store's ANN index (brute force only).")
    ] = False,
    n_boot: Annotated[
        int, typer.Option("--n-boot", min=0, help="Patient-clustered bootstrap replicates.")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    save: Annotated[
        bool,
        typer.Option("--save/--no-save", help="Record the figures in the store's metrics table and plots/."),
    ] = True,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Retrieval quality: precision@k, mAP@k, nDCG@k and kNN-vote AUC, own patient excluded.

    A neighbour is relevant when it shares the query's label or finding; every figure has a
    patient-clustered 95% bootstrap CI, for exact search and the store's index.
    Written to the store's `metrics` table (arm `retrieval`) with a precision@k-by-finding figure.
    """
    spec = resolve_output(fmt, out, as_json=as_json, wide=wide)
    from cxr_embed.retrieval_eval import RetrievalEvalConfig, evaluate_and_record
    from cxr_embed.store import Store

    config = RetrievalEvalConfig(
        ks=parse_ks(k),
        label=label,
        where=where,
        sample=sample,
        n_boot=n_boot,
        seed=seed,
        plan_id=plan,
        index_kinds=("exact",) if exact_only else ("exact", "index"),
    )
    result = evaluate_and_record(Store.open(store), config, save=save)
    report = result.report
    if spec.fmt == "json":
        emit_record(
            {"run_id": result.run_id, "params": report.params, "figure": result.figure, "rows": report.rows},
            [],
            spec,
        )
        return
    emit_rows(
        [{c: getattr(r, c) for c in _COLUMNS} for r in report.rows],
        spec,
        columns=_COLUMNS,
        title=f"retrieval quality: {report.params['n_queries']} queries, {report.params['n_database']} "
        "database rows, patient excluded",
        max_rows=10_000,
    )
    if result.run_id:
        info(f"recorded as run {result.run_id} (metrics arm 'retrieval'); figure {result.figure}")


def register(group: typer.Typer) -> None:
    """Add ``eval`` to the ``search`` group."""
    group.command("eval")(handle_errors(search_eval))
