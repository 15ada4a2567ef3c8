"""The example notebooks execute (nbclient, a real kernel of this interpreter) on the demo store and draw their figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from cxr_embed.errors import ConfigError
from cxr_embed.notebooks import NOTEBOOKS, figures_dir, notebooks_dir, run_notebook, store_path

EXPECTED_FIGURES = {
    "01_quickstart.ipynb": {"01_findings_prevalence.png", "01_age_by_label.png"},
    "02_frozen_vs_finetuned.ipynb": {"02_roc.png", "02_calibration.png", "02_study_table.png"},
    "03_retrieval_gallery.ipynb": {"03_gallery.png", "03_knn_vote.png"},
    "04_embedding_map.ipynb": {"04_embedding_map.png", "04_pca_variance.png"},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _outputs_text(executed: Path) -> str:
    nb = nbformat.read(executed, as_version=4)
    return "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


def test_committed_notebooks_are_valid_and_output_free() -> None:
    assert sorted(p.name for p in notebooks_dir().glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(notebooks_dir() / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, name
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs committed"
        assert "CXR_EMBED_STORE" in nb.cells[0].source, f"{name} must say where it reads the store from"


def test_store_path_needs_the_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CXR_EMBED_STORE", raising=False)
    with pytest.raises(ConfigError, match="CXR_EMBED_STORE"):
        store_path()
    monkeypatch.setenv("CXR_EMBED_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("CXR_EMBED_FIGURES", raising=False)
    assert store_path() == (tmp_path / "store").resolve()
    assert figures_dir() == tmp_path / "figures" and figures_dir().is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_demo_executed_the_notebook_on_its_store(name: str, demo_run) -> None:
    """`cxr-embed demo --notebooks` (the session fixture) ran every notebook with `run_notebook`."""
    runs = {nb["notebook"]: nb for nb in demo_run.result["notebooks"]}
    assert list(runs) == list(NOTEBOOKS)
    run = runs[name]
    figures = [Path(p) for p in run["figures"]]
    assert {p.name for p in figures} == EXPECTED_FIGURES[name]
    for png in figures:
        assert png.parent == demo_run.out / "figures"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000, png
    executed = Path(run["executed"])
    assert executed == demo_run.out / "notebooks" / name
    text = _outputs_text(executed)
    assert str(Path(demo_run.store).resolve()) in text  # the kernel read the store the env var named
    if name == "02_frozen_vs_finetuned.ipynb":
        assert "finetuned" in text and "svm" in text  # both arms made it into the comparison


@pytest.mark.slow
def test_comparison_notebook_without_a_finetuned_arm(frozen_only_store: Path, tmp_path: Path) -> None:
    run = run_notebook(
        "02_frozen_vs_finetuned.ipynb", frozen_only_store, figures=tmp_path / "f", out_dir=tmp_path / "x"
    )
    assert {p.name for p in run.figures} == EXPECTED_FIGURES["02_frozen_vs_finetuned.ipynb"]
    assert "No fine-tuned predictions" in _outputs_text(run.executed_path)


@pytest.mark.slow
def test_gallery_survives_a_moved_source_folder(frozen_only_store: Path, tmp_path: Path) -> None:
    run = run_notebook("03_retrieval_gallery.ipynb", frozen_only_store, figures=tmp_path / "f")
    assert {p.name for p in run.figures} == EXPECTED_FIGURES["03_retrieval_gallery.ipynb"]


@pytest.fixture(scope="module")
def frozen_only_store(demo_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo store's embeddings and frozen-arm results only (fine-tuning never ran), with every image
    path pointing into a folder that no longer exists (the source was moved after indexing)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cxr_embed.store import Store, build_store_from_arrays

    demo = Store.open(demo_run.store)
    meta = demo.metadata()
    moved = pc.binary_join_element_wise(pa.scalar("/moved-away/"), meta["image_id"], "")
    meta = meta.set_column(meta.schema.get_field_index("path"), "path", moved)
    store = build_store_from_arrays(tmp_path_factory.mktemp("frozen_only") / "store", demo.embeddings(), meta)
    for table, column, keep in (
        ("predictions", "arm", "frozen"),
        ("metrics", "arm", "frozen"),
        ("runs", "kind", "classify"),
    ):
        data = demo.read_results(table)
        store.write_results(table, data.filter(pc.equal(data[column], keep)))
    return store.path


def test_a_notebook_runs_quietly(synthetic_store, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """No kernel log lines ([IPKernelApp] WARNING …) reach the user's terminal; outputs still come back."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import os, sys\nprint(os.environ['CXR_EMBED_STORE'])\nprint('e', file=sys.stderr)"
        )
    )
    path = tmp_path / "09_quiet.ipynb"
    nbformat.write(nb, path)
    run = run_notebook(path, synthetic_store.path, figures=tmp_path / "fig", out_dir=tmp_path / "out")
    captured = capfd.readouterr()
    assert "IPKernelApp" not in captured.err and "WARNING" not in captured.err, captured.err
    executed = nbformat.read(run.executed_path, as_version=4)
    assert executed.cells[0].outputs[0]["text"].strip() == str(synthetic_store.path.resolve())
