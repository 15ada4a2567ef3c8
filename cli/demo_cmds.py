"""CLI command: ``cxr-embed demo`` runs the whole product offline on synthetic chest X-rays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.classify_cmds import STUDY_TABLE, emit_study, study_rows
from cxr_embed_cli.output import (
    FormatOpt,
    JsonOpt,
    ModelDirOpt,
    OutOpt,
    OutputSpec,
    QuietOpt,
    WideOpt,
    emit_record,
    emit_rows,
    handle_errors,
    info,
    quiet_progress,
    resolve_output,
    stderr,
    stdout,
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("demo")(demo)


@handle_errors
def demo(
    out: Annotated[
        Path, typer.Option("--dir", "-d", help="Folder for the dataset, the store and the fine-tuning run.")
    ] = Path("cxr-embed-demo"),
    n: Annotated[
        int, typer.Option("--n", "-n", help="Number of synthetic images (at least 40).", min=1)
    ] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the dataset, folds and training.")] = 0,
    skip_finetune: Annotated[
        bool, typer.Option("--skip-finetune", help="Skip the fine-tuning stage (the slowest one).")
    ] = False,
    epochs: Annotated[int, typer.Option("--epochs", help="Fine-tuning epochs.", min=1)] = 2,
    notebooks: Annotated[
        bool,
        typer.Option(
            "--notebooks",
            help="Also execute notebooks/*.ipynb on the store: executed copies in DIR/notebooks, PNG figures in "
            "DIR/figures (source checkout only).",
        ),
    ] = False,
    model_dir: ModelDirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a previous demo in --dir.")] = False,
    fmt: FormatOpt = None,
    out_file: OutOpt = None,
    wide: WideOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run everything offline on synthetic chest X-rays: synth → index → classify → fine-tune → study → search → SQL.

    Both arms (5 classifiers on frozen embeddings, the fine-tuned model) are tested on the same
    hold-out patients and compared with patient-clustered CIs and DeLong's paired test.

    Uses the official MedImageInsight weights when a model folder resolves (--model-dir,
    $CXR_EMBED_MODEL_DIR or `cxr-embed model pull`), else the tiny test model packaged with
    cxr-embed, whose numbers mean nothing clinically. With the tiny model the default 200 images
    take a few minutes on 2 CPU cores. Leaves a store that `cxr-embed sql`, `cxr-embed search`
    and the notebooks in notebooks/ read.
    """
    quiet_progress(quiet)
    from cxr_embed.demo import DemoConfig, run_demo

    spec = resolve_output(fmt, out_file, as_json=json_out, wide=wide)
    config = DemoConfig(
        out=out,
        n=n,
        seed=seed,
        model_dir=model_dir,
        finetune=not skip_finetune,
        finetune_epochs=epochs,
        notebooks=notebooks,
        force=force,
        progress=True,
    )
    result = run_demo(config, log=_log)
    if spec.fmt == "json":
        emit_record(result, [], spec)
    elif spec.fmt != "table":  # files and pipes: the study table at full precision (the report is for people)
        emit_study(study_rows(result.study_table), spec, "")
    else:
        print_result(result, spec)


DEMO_STUDY = STUDY_TABLE[:10]
"""The study columns the demo shows first: the comparison, then calibration and accuracy."""


def print_result(result, spec: OutputSpec | None = None) -> None:
    """The demo's human-readable report of a :class:`cxr_embed.demo.DemoResult` (stdout; reminders on stderr)."""
    spec = spec or OutputSpec("table")
    stdout.print()
    emit_study(
        study_rows(result.study_table),
        spec,
        f"Normal vs Abnormal on the same {result.n_test_images} test images ({result.n_test_patients} patients, "
        f"plan {result.plan_id}); 95% CIs resample patients; paired vs {result.reference} (DeLong p)",
        columns=DEMO_STUDY,
    )
    for s in result.search:
        emit_rows(
            [{**nb, "findings": ", ".join(nb["findings"])} for nb in s["neighbors"]],
            spec,
            title=f"Similar cases for {s['query']!r} (kNN-vote P(abnormal) = {_fmt(s['probability_abnormal'])})",
            columns=("rank", "image_id", "patient_id", "label", "findings", "similarity"),
        )
    stdout.print(
        "\n[bold]Explore the results with SQL[/] (views: images, embeddings, study, latest_metrics, "
        "latest_predictions, predictions, metrics, runs, splits, errors):"
    )
    for ex in result.sql_examples:
        stdout.print(f"\n# {ex.title}", highlight=False)
        stdout.print(ex.command, highlight=False, markup=False, soft_wrap=True)
    stdout.print(
        f"\nSearch: cxr-embed search --store {result.store} --id {result.search[0]['query']} -k 5 --exclude-same-patient"
        f"\nNotebooks: {result.notebooks_command}",
        highlight=False,
        markup=False,
    )
    for nb in result.notebooks:
        stdout.print(
            f"Executed {nb['executed']} ({nb['seconds']:.0f} s): {len(nb['figures'])} figure(s)",
            highlight=False,
        )
    stdout.print(
        f"\nDone in {result.timings['total']:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items() if k != "total"),
        highlight=False,
    )
    for notice in result.notices:
        stderr.print(f"[bold yellow]Reminder:[/] {notice.removeprefix('NOTICE: ')}", highlight=False)


def _log(message: str) -> None:
    if message.startswith("NOTICE"):
        stderr.rule("[bold red]TINY TEST MODEL[/]" if "TINY TEST MODEL" in message else "[bold red]SLOW[/]")
        stderr.print(f"[bold red]{message}[/]", highlight=False)
        stderr.rule(style="red")
    else:
        info(message)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
