"""The offline demo: the whole product, end to end, on synthetic chest X-rays, with no download.

``cxr-embed demo`` is the first command a newcomer runs, so it must work on a fresh machine with no
network and no GPU, in minutes. It chains the real library stages (nothing here re-implements them):

1. ``synth.generate``: a small ChestX-ray14-like dataset (real layout, CSV, official split lists);
2. ``job.run_index``: the embedding store (Parquet + FAISS), with the official weights when a model
   folder resolves, else the tiny test model packaged with cxr-embed (a loud notice says its numbers
   mean nothing clinically: it only proves the pipeline);
3. ``evaluation.classify_store``: the five classifiers on a patient-disjoint hold-out plan stored in
   the store (arm ``frozen``);
4. ``finetune.finetune``: a short end-to-end fine-tune on the *same* plan, writing into the same
   store (arm ``finetuned``), then ``study.run_study``: both arms on the same test images, with
   patient-clustered CIs and the paired DeLong test;
5. ``retrieval``: similar cases for a stored image (own patient excluded) and for a text query;
6. ``sql.run_query``: the example queries the demo prints are run once, so they are known to work.

Why 200 images at 512 px by default: with the tiny model a 480² forward costs ~0.05-0.1 s of CPU per
image and fine-tuning ~3x that, so the whole demo stays well inside 10 minutes on 2 cores while
the hold-out test set both arms are scored on still holds a few dozen images of ~18 patients.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxr_embed.atomicio import write_json_atomic
from cxr_embed.errors import ConfigError, ModelNotFoundError

DEFAULT_DIR = Path("cxr-embed-demo")
MARKER = "demo.json"
MIN_IMAGES = 40  # train/validation/test patients with both classes each need a few dozen images
TEXT_QUERY = "pleural effusion"

TINY_MODEL_NOTICE = (
    "NOTICE: no MedImageInsight weights were found, so this demo uses the TINY TEST MODEL packaged with "
    "cxr-embed (32-d embeddings from a small random network). It shows that every stage works; its "
    "ROC-AUCs, neighbours and fine-tuning results mean NOTHING clinically. For real embeddings run "
    "`cxr-embed model pull` (or set $CXR_EMBED_MODEL_DIR) and run the demo again."
)

FULL_MODEL_ON_CPU_NOTICE = (
    "NOTICE: the official MedImageInsight weights run on the CPU here (no CUDA GPU): embedding alone costs "
    "about 5 s per image, so {n} images take about {minutes} min and fine-tuning far longer. For a quick look "
    "use --n 48 --skip-finetune."
)

Log = Callable[[str], None]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class DemoConfig:
    """Options of ``cxr-embed demo``."""

    out: Path = DEFAULT_DIR
    n: int = 200
    seed: int = 0
    image_size: int = 512
    model_dir: Path | None = None
    finetune: bool = True
    finetune_epochs: int = 2
    test_fraction: float = 0.3  # share of patients in the hold-out test set both arms are scored on
    k: int = 5
    n_boot: int = 200  # bootstrap replicates of the ROC-AUC CI (1000 in `classify`; 200 keeps the demo quick)
    notebooks: bool = False  # also execute notebooks/*.ipynb on the store (executed copies + PNG figures)
    force: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.n < MIN_IMAGES:
            raise ConfigError(f"--n must be at least {MIN_IMAGES}: train, validation and test patients need a few dozen images.")
        if not 64 <= self.image_size <= 2048:
            raise ConfigError("The demo's image size must be between 64 and 2048 pixels.")
        if self.finetune_epochs < 1 or self.k < 1:
            raise ConfigError("Fine-tuning epochs and k must be at least 1.")


@dataclass(frozen=True)
class SqlExample:
    """A query the user can paste: what it shows, the SQL, and the full command line."""

    title: str
    sql: str
    command: str
    rows: int


@dataclass
class DemoResult:
    """Everything the demo made and measured (``--json`` prints it)."""

    out: str
    data: str
    store: str
    finetune_out: str | None
    model_dir: str
    model_id: str
    tiny_model: bool
    n_images: int
    n_patients: int
    n_abnormal: int
    n_errors: int
    study_table: list[dict[str, Any]]  # one row per arm, same test rows: metrics, CIs, paired test vs reference
    study_id: str
    plan_id: str
    reference: str
    n_test_images: int
    n_test_patients: int
    search: list[dict[str, Any]]
    sql_examples: list[SqlExample]
    notebooks_command: str
    notebooks: list[dict[str, Any]] = field(default_factory=list)  # executed notebooks (with --notebooks)
    timings: dict[str, float] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)


def choose_model(model_dir: Path | None) -> tuple[Path, bool]:
    """The model folder that resolves (option, env var, pull cache), else the packaged tiny model.

    Returns ``(folder, is_tiny)``. A folder the user named explicitly must exist: falling back
    silently would hide their mistake.
    """
    from cxr_embed.model import resolve_model_dir, tiny_model_dir

    tiny = tiny_model_dir()
    try:
        found = resolve_model_dir(model_dir)
    except ModelNotFoundError:
        if model_dir is not None:
            raise
        return tiny, True
    return found, found.resolve() == tiny.resolve()


def prepare_out(out: Path, force: bool) -> Path:
    """Create the demo folder; refuse to touch a non-empty folder that is not a previous demo.

    ``force`` replaces a previous demo folder (recognised by its ``demo.json``), never anything else.
    """
    out = out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"{out} exists and is not a cxr-embed demo folder; choose another --dir.")
        if not force:
            raise ConfigError(f"{out} already holds a demo. Pass --force to replace it, or choose another --dir.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"status": "running"}, out / MARKER)
    return out


def run_demo(config: DemoConfig, log: Log | None = None) -> DemoResult:
    """Run every stage (see the module docstring) into ``config.out`` and return what it made."""
    config.validate()
    say = log or (lambda _msg: None)
    timings: dict[str, float] = {}
    notices: list[str] = []
    start = time.perf_counter()

    model_dir, tiny = choose_model(config.model_dir)
    out = prepare_out(Path(config.out), config.force)
    data, store_dir, ft_dir = out / "data", out / "store", out / "finetune"
    if tiny:
        notices.append(TINY_MODEL_NOTICE)
    elif not _has_gpu():
        notices.append(FULL_MODEL_ON_CPU_NOTICE.format(n=config.n, minutes=round(config.n * 5 / 60)))
    for notice in notices:
        say(notice)

    say(f"[1/6] Synthesising {config.n} chest X-rays ({config.image_size} px) in {data}")
    t0 = time.perf_counter()
    synth = _synthesise(data, config)
    timings["synth"] = time.perf_counter() - t0

    say(f"[2/6] Indexing them into the store {store_dir} with {'the tiny test model' if tiny else model_dir}")
    t0 = time.perf_counter()
    store = _index(data, store_dir, model_dir, config)
    timings["index"] = time.perf_counter() - t0

    say(f"[3/6] Classifying Normal/Abnormal with 5 classifiers on a hold-out plan ({config.test_fraction:g} of "
        "patients as test)")
    t0 = time.perf_counter()
    classified = _classify(store, config)
    plan_id = classified.plan_id
    notices.extend(f"NOTICE: classify: {w}" for w in classified.warnings)
    timings["classify"] = time.perf_counter() - t0

    if config.finetune:
        say(f"[4/6] Fine-tuning the image tower for {config.finetune_epochs} epoch(s) into {ft_dir}, same plan")
        t0 = time.perf_counter()
        warnings = _finetune(data, ft_dir, store_dir, model_dir, tiny, config, plan_id).warnings
        notices.extend(f"NOTICE: fine-tuning: {w}" for w in warnings)
        timings["finetune"] = time.perf_counter() - t0
    else:
        say("[4/6] Fine-tuning skipped (--skip-finetune)")
    t0 = time.perf_counter()
    study = _study(store, config, plan_id)
    timings["study"] = time.perf_counter() - t0

    say(f"[5/6] Searching similar cases (k={config.k}, same patient excluded) and by text '{TEXT_QUERY}'")
    t0 = time.perf_counter()
    search = _search(store, model_dir, config.k)
    timings["search"] = time.perf_counter() - t0

    say("[6/6] Running the example SQL")
    t0 = time.perf_counter()
    examples = _sql_examples(store, search[0]["query"])
    timings["sql"] = time.perf_counter() - t0

    notebooks: list[dict[str, Any]] = []
    if config.notebooks:
        say(f"Executing the notebooks on the store (copies with outputs in {out / 'notebooks'}, figures in {out / 'figures'})")
        t0 = time.perf_counter()
        notebooks = _notebooks(store_dir, out, notices, say)
        timings["notebooks"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    result = DemoResult(
        out=str(out), data=str(data), store=str(store_dir), finetune_out=str(ft_dir) if config.finetune else None,
        model_dir=str(model_dir), model_id=store.model_id, tiny_model=tiny, n_images=len(store),
        n_patients=synth.n_patients, n_abnormal=synth.n_abnormal, n_errors=store.errors().num_rows,
        study_table=study.table(), study_id=study.study_id, plan_id=plan_id, reference=study.reference,
        n_test_images=study.n_images, n_test_patients=study.n_patients, search=search, sql_examples=examples,
        notebooks_command=f"CXR_EMBED_STORE={store_dir} jupyter lab notebooks/  (or rerun with --notebooks)", notebooks=notebooks,
        timings={k: round(v, 2) for k, v in timings.items()}, notices=notices,
    )
    write_json_atomic({"status": "complete", **asdict(result)}, out / MARKER)
    return result


# ------------------------------------------------------------------------------------------ stages


def _synthesise(data: Path, config: DemoConfig):
    from cxr_embed import synth

    return synth.generate(data, config.n, layout="chestxray14", seed=config.seed, size=config.image_size)


def _index(data: Path, store_dir: Path, model_dir: Path, config: DemoConfig):
    from cxr_embed.job import IndexConfig, run_index
    from cxr_embed.store import Store

    run_index(data, store_dir, IndexConfig(dataset="chestxray14", model_dir=model_dir), progress=config.progress)
    return Store.open(store_dir)


def _classify(store, config: DemoConfig):
    from cxr_embed.evaluation import ClassifyConfig, classify_store

    return classify_store(store, ClassifyConfig(split="holdout", test_fraction=config.test_fraction, seed=config.seed,
                                                n_boot=config.n_boot, progress=config.progress))


def _study(store, config: DemoConfig, plan_id: str):
    from cxr_embed.study import StudyConfig, run_study

    return run_study(store, StudyConfig(plan_id=plan_id, n_boot=config.n_boot, seed=config.seed))


def _finetune(data: Path, ft_dir: Path, store_dir: Path, model_dir: Path, tiny: bool, config: DemoConfig,
              plan_id: str):
    """A short run: the study's settings for real weights; a higher learning rate for the tiny model,
    whose random weights would not move visibly at 1e-5 in two epochs."""
    from cxr_embed.finetune import FineTuneConfig, finetune

    ft = FineTuneConfig(
        source=str(data), out=str(ft_dir), dataset="chestxray14", model_dir=str(model_dir),
        epochs=config.finetune_epochs, lr=1e-3 if tiny else 1e-5, batch_size=16 if tiny else 48,
        store=str(store_dir), seed=config.seed, n_boot=config.n_boot, plan=plan_id,
    )
    return finetune(ft, progress=config.progress)


def _notebooks(store_dir: Path, out: Path, notices: list[str], say: Log) -> list[dict[str, Any]]:
    """Execute the example notebooks when this is a source checkout (they are not installed with the wheel)."""
    from cxr_embed import notebooks

    if not notebooks.notebooks_dir().is_dir():
        notices.append(f"The notebooks were not run: {notebooks.notebooks_dir()} does not exist (they ship with the "
                       "source checkout, not the installed package).")
        say(notices[-1])
        return []
    runs = notebooks.run_notebooks(store_dir, figures=out / "figures", out_dir=out / "notebooks")
    return [{"notebook": r.notebook, "executed": str(r.executed_path), "seconds": round(r.seconds, 1),
             "figures": [str(p) for p in r.figures]} for r in runs]


def _search(store, model_dir: Path, k: int) -> list[dict[str, Any]]:
    """One abnormal stored image as the query (its own patient excluded), and one text query."""
    from cxr_embed import retrieval
    from cxr_embed.model import MedImageInsight
    from cxr_embed.sql import run_query

    query = run_query(store, "SELECT image_id FROM images WHERE label = 1 ORDER BY row_id LIMIT 1").column(0)
    query_id = query[0].as_py() if len(query) else store.metadata(["image_id"]).column(0)[0].as_py()
    by_id = retrieval.search_by_ids(store, [query_id], k=k, exclude_same_patient=True)[0]
    model = MedImageInsight.load(model_dir, device="cpu")
    by_text = retrieval.search_by_texts(store, model, [TEXT_QUERY], k=k)[0]
    return [_search_row(query_id, by_id), _search_row(TEXT_QUERY, by_text)]


def _search_row(query: str, result) -> dict[str, Any]:
    return {
        "query": query,
        "probability_abnormal": result.probability_abnormal,
        "neighbors": [
            {"rank": n.rank, "image_id": n.image_id, "patient_id": n.patient_id, "label": n.label,
             "findings": list(n.findings or ()), "similarity": round(float(n.similarity), 4)}
            for n in result.neighbors
        ],
    }


def example_queries(query_id: str) -> list[tuple[str, str]]:
    """(title, SQL) pairs the demo prints for the user to explore (each runs once before it is printed)."""
    return [
        ("Images, patients and views by label",
         "SELECT label, view, count(*) AS images, count(DISTINCT patient_id) AS patients "
         "FROM images GROUP BY ALL ORDER BY ALL"),
        ("The study: both arms on the same test rows, 95% CIs by patient, paired tests vs the reference",
         "SELECT arm, classifier, metric, round(value, 3) AS value, round(ci_low, 3) AS ci_low, "
         "round(ci_high, 3) AS ci_high, round(p_value, 4) AS p_value, n, versus FROM study "
         "WHERE metric IN ('roc_auc', 'brier', 'roc_auc_diff', 'brier_diff') ORDER BY metric, arm, classifier"),
        ("Latest run per classifier: ROC-AUC with its CI and the plan it was tested on",
         "SELECT arm, classifier, plan_id, round(value, 3) AS roc_auc, round(ci_low, 3) AS ci_low, "
         "round(ci_high, 3) AS ci_high FROM latest_metrics "
         "WHERE metric = 'roc_auc' AND fold = -1 AND subgroup IS NULL AND target = 'abnormal' ORDER BY roc_auc DESC"),
        ("Subgroups as columns: ROC-AUC by sex for the latest SVM",
         "SELECT subgroup, level, round(value, 3) AS roc_auc, round(ci_low, 3) AS ci_low, round(ci_high, 3) AS ci_high "
         "FROM latest_metrics WHERE classifier = 'svm' AND metric = 'roc_auc' AND subgroup = 'sex' ORDER BY level"),
        ("The SVM's most confident misses, with their metadata",
         "SELECT p.image_id, i.patient_id, i.view, round(p.probability, 3) AS p_abnormal "
         "FROM latest_predictions p JOIN images i USING (row_id) "
         "WHERE p.classifier = 'svm' AND p.label = 1 ORDER BY p.probability LIMIT 5"),
        ("Nearest neighbours from SQL",
         f"SELECT n.rank, n.image_id, n.label, round(n.similarity, 3) AS similarity, i.view "
         f"FROM neighbors('{query_id}', k := 5) n JOIN images i USING (row_id)"),
    ]


def _sql_examples(store, query_id: str) -> list[SqlExample]:
    """Run every example once, so the printed ones are known to work."""
    from cxr_embed.sql import run_query

    examples = []
    for title, sql in example_queries(query_id):
        table = run_query(store, sql)
        command = f'cxr-embed sql --store {store.path} "{sql}"'
        examples.append(SqlExample(title=title, sql=sql, command=command, rows=table.num_rows))
    return examples
