"""Entry point of the ``cxr-embed`` console script: builds the Typer app from the command modules."""

from __future__ import annotations

import typer
from cxr_embed_cli import (
    classify_cmds,
    demo_cmds,
    finetune_cmds,
    index_cmds,
    model_cmds,
    search_cmds,
    serve_cmds,
    sql_cmds,
    synth_cmds,
)

app = typer.Typer(
    name="cxr-embed",
    help="MedImageInsight embeddings for chest X-rays: index a folder into Parquet + FAISS, classify "
    "Normal/Abnormal with leak-free CV, find similar cases, fine-tune, and query it all with SQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for module in (model_cmds, synth_cmds, index_cmds, classify_cmds, search_cmds, sql_cmds, finetune_cmds, demo_cmds,
               serve_cmds):
    module.register(app)

if __name__ == "__main__":  # pragma: no cover
    app()
