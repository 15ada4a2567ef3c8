"""Shared fixtures: tiny real things (the tiny reference model, synthetic images, small stores) in tmp dirs.

Each area owns one marked section below; keep fixtures session-scoped when they are expensive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests when no CUDA device is present (CI has none)."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_config_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test writes the user's real config dir (the DICOM reader creates its key file there)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "xdg-config"))
    monkeypatch.delenv("CXR_EMBED_ID_SALT", raising=False)


# --- section: model (issue 2) ---

REFERENCE = DATA / "reference"
REFERENCE_IMAGES = ("01_cxr_gray8_1024x1024.png", "03_rgb_800x600.jpg", "04_tiny_gray8_60x40.png",
                    "05_wide_gray8_1600x100.png")  # the 4 the reference accepts, in preprocessed.npy row order


@pytest.fixture(scope="session")
def tiny_model():
    """The packaged tiny parity model, loaded strictly on CPU in fp32 (shared: do not mutate it)."""
    from cxr_embed.model import MedImageInsight, tiny_model_dir

    return MedImageInsight.load(tiny_model_dir(), device="cpu")


@pytest.fixture(scope="session")
def reference_batch():
    """(4, 3, 480, 480) float32: the reference's preprocessed tensor, rebuilt losslessly from uint8 levels."""
    import numpy as np
    import torch

    levels = np.load(REFERENCE / "preprocessed_uint8.npz")["levels"]
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return torch.from_numpy((levels.astype(np.float32) / np.float32(255) - mean) / std)


# --- section: readers (issue 3) ---

SYNTH_CXR14_N = 40
SYNTH_CXR14_SEED = 0
SYNTH_CXR14_SIZE = 256


@pytest.fixture(scope="session")
def synth_cxr14(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic ChestX-ray14 folder (``cxr-embed synth --n 40 --seed 0 --size 256``), made once.

    Layout as NIH ships it: ``images_001/images/<patient:08d>_<followup:03d>.png`` (256x256 8-bit
    grayscale), ``Data_Entry_2017_v2020.csv``, ``train_val_list.txt``, ``test_list.txt``, plus
    ``synth.json`` (the counts). Contents: 40 images of 15 patients (1-5 follow-ups each), exactly
    20 abnormal / 20 normal, split patient-wise into 31 train / 9 test images. Read it with
    ``cxr_embed.readers.read_dataset(path)`` (40 records, no failures). Treat it as read-only:
    it is shared by the whole session; copy it (``shutil.copytree``) before modifying.
    """
    from cxr_embed.synth import generate

    root = tmp_path_factory.mktemp("synth_cxr14")
    generate(root, SYNTH_CXR14_N, layout="chestxray14", seed=SYNTH_CXR14_SEED, size=SYNTH_CXR14_SIZE)
    return root


# --- section: store (issue 4) ---

SYNTHETIC_STORE_PATIENTS = 120
SYNTHETIC_STORE_IMAGES_PER_PATIENT = 5
SYNTHETIC_STORE_DIM = 64


def make_synthetic_store_arrays(seed: int = 0):
    """(embeddings, rows) behind the ``synthetic_store`` fixture; see its docstring for the contents."""
    import numpy as np

    from cxr_embed.records import FINDINGS

    rng = np.random.default_rng(seed)
    d = SYNTHETIC_STORE_DIM
    centers = rng.normal(size=(2, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rows, vectors = [], []
    for p in range(SYNTHETIC_STORE_PATIENTS):
        patient_vec = rng.normal(size=d) / np.sqrt(d)
        sex, age = ("M", "F")[p % 2], float(rng.integers(20, 90))
        split = "train" if p < SYNTHETIC_STORE_PATIENTS * 4 // 5 else "test"
        risk = rng.uniform(0.1, 0.8)
        for study in range(SYNTHETIC_STORE_IMAGES_PER_PATIENT):
            label = int(rng.random() < risk)
            flags = [0] * len(FINDINGS)
            if label:
                for i in rng.choice(len(FINDINGS), size=int(rng.integers(1, 4)), replace=False):
                    flags[i] = 1
            image_id = f"{p + 1:08d}_{study:03d}.png"
            rows.append({
                "image_id": image_id, "path": f"/synthetic/images/{image_id}", "patient_id": f"{p + 1:08d}",
                "study": study, "split": split, "label": label, "findings": tuple(flags), "sex": sex,
                "age": age + study, "view": ("PA", "AP")[int(rng.random() < 0.3)], "source": "synth",
            })
            vectors.append(0.2 * centers[label] + 1.0 * patient_vec + rng.normal(size=d) / np.sqrt(d))
    emb = np.asarray(vectors, dtype=np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), rows


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory):
    """A 600-row x 64-dim store built with ``build_store_from_arrays`` (no model, instant). Read-only.

    - 120 patients ``00000001``..``00000120``, 5 images each (``study`` 0..4), image_id
      ``<patient:08d>_<study:03d>.png`` (ChestX-ray14 style), row_id = (patient-1)*5 + study;
    - split by patient: patients 1-96 ``train`` (480 rows), 97-120 ``test`` (120 rows);
    - ``label`` 1 with a per-patient risk in U(0.1, 0.8) (277 of 600 abnormal); abnormal rows
      have 1-3 of the 14 finding flags set, normal rows none; sex alternates M/F by patient, age
      20-93, view PA (70%) / AP, source ``synth``;
    - embeddings are unit-norm: 0.2 * class centre + 1.0 * patient vector + noise. So a linear
      classifier finds real but imperfect signal (5-fold patient-grouped logistic regression AUC
      0.88), and an image's nearest neighbour is its own patient's other image 98% of the time
      (what patient exclusion in retrieval must remove; a row-wise split would leak);
    - model_id ``synthetic``, checkpoint_sha256 ``"0"*64``, preprocess_fingerprint ``synthetic``,
      flat index, two shards (512 + 88 rows).

    The arrays are reproducible with ``make_synthetic_store_arrays()``. Copy the folder
    (``shutil.copytree(store.path, ...)``) before writing results into it.
    """
    from cxr_embed.store import build_store_from_arrays

    emb, rows = make_synthetic_store_arrays()
    return build_store_from_arrays(tmp_path_factory.mktemp("synthetic_store") / "store", emb, rows, shard_size=512)

@pytest.fixture(scope="session")
def tiny_store(synth_cxr14: Path, tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """The real index job on ``synth_cxr14`` with the tiny model (CPU, fp32). Read-only ``Store``.

    40 rows (row_id follows the ChestX-ray14 listing order), 32-dim unit-norm embeddings, model_id
    ``cxr-embed-tiny-parity-fixture``, the real preprocessing fingerprint, flat index, shards of
    16 rows (16 + 16 + 8), no errors; metadata as in ``synth_cxr14`` (15 patients, 20/20 labels,
    31 train / 9 test). Costs about 40 tiny-model forwards once per session. Copy the folder
    (``shutil.copytree(store.path, ...)``) before writing results into it.
    """
    from cxr_embed.job import IndexConfig, run_index
    from cxr_embed.store import Store

    path = tmp_path_factory.mktemp("tiny_store") / "store"
    config = IndexConfig(device="cpu", batch_size=8, workers=1, shard_size=TINY_STORE_SHARD_SIZE)
    run_index(synth_cxr14, path, config, progress=False, model=tiny_model)
    return Store.open(path)


TINY_STORE_SHARD_SIZE = 16


# --- section: classify (issue 5) ---


@pytest.fixture(scope="session")
def signal_arrays():
    """(embeddings, rows) of 600 images (~165 patients, 32-d) with a strong known label signal.

    Built by ``cohort.synthetic_cohort`` (separation 3: every classifier reaches ROC-AUC > 0.9);
    abnormal rows carry 1-2 of the first four FINDINGS, so the other ten have no positives. Patients
    with an even number are ``train``, odd ``test`` (for ``--split official``).
    """
    import numpy as np

    from cxr_embed.cohort import synthetic_cohort
    from cxr_embed.records import FINDINGS

    c = synthetic_cohort(600, 32, separation=3.0, n_clusters=8, seed=1)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(len(c.labels)):
        label = int(c.labels[i])
        flags = dict.fromkeys(FINDINGS, 0)
        if label:
            for f in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
                flags[FINDINGS[f]] = 1
        rows.append({
            "image_id": f"img{i:04d}.png", "path": f"/synthetic/img{i:04d}.png", "patient_id": str(c.patients[i]),
            "study": 0, "split": ("train", "test")[int(c.patients[i][1:]) % 2], "label": label, **flags,
            "sex": str(c.sex[i]), "age": float(c.age[i]), "view": str(c.view[i]), "source": "synth",
        })
    return c.embeddings, rows


@pytest.fixture
def signal_store(tmp_path, signal_arrays):
    """A fresh writable store of :func:`signal_arrays` (building it takes well under a second)."""
    from cxr_embed.store import build_store_from_arrays

    emb, rows = signal_arrays
    return build_store_from_arrays(tmp_path / "signal_store", emb, rows)


@pytest.fixture(scope="session")
def signal_run(tmp_path_factory, signal_arrays):
    """One full ``classify_store`` run (5 classifiers, 3 folds, refit, plots) shared by the checks."""
    from cxr_embed.evaluation import ClassifyConfig, classify_store
    from cxr_embed.store import build_store_from_arrays

    emb, rows = signal_arrays
    store = build_store_from_arrays(tmp_path_factory.mktemp("signal_run") / "store", emb, rows)
    return store, classify_store(store, ClassifyConfig(folds=3, n_boot=200, calibration="platt"))

# --- section: search/sql (issue 6) ---

SEARCH_PATIENTS = 200
SEARCH_PER_PATIENT = 10
SEARCH_DIM = 32
SEARCH_RARE_VIEW_ROWS = 20  # view == 'LL' on exactly 1% of the 2000 rows


@pytest.fixture(scope="session")
def search_arrays():
    """(embeddings, metadata rows) of 2000 images: 200 patients x 10, each patient's images a tight
    cluster (so a naive neighbour list is all the query's own patient), 1% of rows with view 'LL'."""
    import numpy as np

    from cxr_embed.records import FINDINGS

    rng = np.random.default_rng(6)
    centres = rng.standard_normal((SEARCH_PATIENTS, SEARCH_DIM)).astype(np.float32)
    n = SEARCH_PATIENTS * SEARCH_PER_PATIENT
    emb = np.repeat(centres, SEARCH_PER_PATIENT, axis=0) + 0.1 * rng.standard_normal((n, SEARCH_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rare = set(rng.choice(n, SEARCH_RARE_VIEW_ROWS, replace=False).tolist())
    rows = []
    for i in range(n):
        patient, follow_up = divmod(i, SEARCH_PER_PATIENT)
        label = int(patient % 2)
        image_id = f"{patient:08d}_{follow_up:03d}.png"
        rows.append({
            "image_id": image_id,
            "path": f"/data/images/{image_id}",
            "patient_id": f"{patient:08d}",
            "study": follow_up,
            "split": "test" if patient % 5 == 0 else "train",
            "label": label,
            **{f: int(label and j == patient % len(FINDINGS)) for j, f in enumerate(FINDINGS)},
            "sex": "F" if patient % 3 else "M",
            "age": float(20 + patient % 60),
            "view": "LL" if i in rare else ("AP" if i % 2 else "PA"),
            "source": "synth",
        })
    return emb, rows


@pytest.fixture(scope="session")
def search_store(tmp_path_factory: pytest.TempPathFactory, search_arrays):
    """A flat-index store of :func:`search_arrays`, with a small predictions table for SQL joins."""
    import pyarrow as pa

    from cxr_embed.store import build_store_from_arrays

    emb, rows = search_arrays
    store = build_store_from_arrays(tmp_path_factory.mktemp("search") / "store", emb, rows)
    store.write_results("predictions", pa.table({
        "run_id": ["r1"] * 4, "plan_id": ["kfold-test"] * 4, "arm": ["frozen"] * 4, "classifier": ["logreg"] * 4, "target": ["abnormal"] * 4,
        "fold": [0, 0, 1, 1], "row_id": [0, 10, 20, 30], "image_id": [rows[i]["image_id"] for i in (0, 10, 20, 30)],
        "probability": [0.1, 0.9, 0.2, 0.8], "probability_raw": [0.1, 0.9, 0.2, 0.8], "label": [rows[i]["label"] for i in (0, 10, 20, 30)],
    }))
    return store


# --- section: finetune (issue 7) ---

@pytest.fixture(scope="session")
def synth_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic ChestX-ray14 images (64x64 files; the model still sees 480x480) for fine-tuning runs.

    Patient-wise with the default fine-tuning fractions: 10 train, 4 validation, 2 test images, so a
    training step stays cheap on CPU. Read-only, shared by the session.
    """
    from cxr_embed.synth import generate

    root = tmp_path_factory.mktemp("synth_small")
    generate(root, 16, layout="chestxray14", seed=0, size=64)
    return root


# --- section: demo (issue 9) ---

DEMO_N = 48


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """``cxr-embed demo --n 48 --epochs 1 --notebooks --json`` once per session through the real CLI. Read-only.

    No model folder resolves (``$CXR_EMBED_MODEL_DIR`` unset, an empty cache dir), so it falls back
    to the packaged tiny model, as on a fresh machine. Returns a namespace with ``out`` (the demo
    folder), ``store`` (its store: 48 rows, predictions of the 5 frozen classifiers and of one
    fine-tuning run), ``result`` (the parsed ``--json`` document, whose ``notebooks`` lists the 4 executed
    notebooks: copies in ``out/notebooks``, figures in ``out/figures``) and ``stderr``. About 1.5 min of CPU.
    """
    import json
    from types import SimpleNamespace

    from cxr_embed_cli.main import app
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("demo") / "demo"
    env = {"CXR_EMBED_MODEL_DIR": None, "CXR_EMBED_CACHE_DIR": str(tmp_path_factory.mktemp("empty-cache"))}
    args = ["demo", "--dir", str(out), "--n", str(DEMO_N), "--epochs", "1", "--notebooks", "--json"]
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 0, f"demo failed:\n{res.stderr}\n{res.exception!r}"
    return SimpleNamespace(out=out, store=out / "store", result=json.loads(res.stdout), stderr=res.stderr)
