"""ROC, precision-recall and reliability plots, as PNG files (matplotlib Agg).

A classify run gets one figure per (kind, target) with every classifier overlaid:
``plots/<run_id>/roc_<target>.png``, ``pr_<target>.png``, ``reliability_<target>.png``. A study gets
``plots/<study_id>/study_roc_<target>.png`` (every arm, operating points marked, n in the legend)
and ``study_reliability_<target>.png`` (the reference and the fine-tuned arm on the same rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr_embed import metrics
from cxr_embed.atomicio import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_run(folder: str | Path, results: Sequence) -> list[Path]:
    """Write the three figures per target of ``results`` (``crossval.ModelResult``) into ``folder``."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for target in dict.fromkeys(r.target for r in results):
        group = [r for r in results if r.target == target and len(np.unique(r.labels)) == 2]
        if not group:
            continue
        plt, fig, ax = _figure()
        for r in group:
            fpr, tpr, _ = roc_curve(r.labels, r.prob)
            ax.plot(fpr, tpr, label=f"{r.classifier} (AUC {r.pooled.values['roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        written.append(_save(plt, fig, ax, folder / f"roc_{target}.png", f"ROC: {target}", "1 - specificity", "sensitivity"))
        plt, fig, ax = _figure()
        for r in group:
            precision, recall, _ = precision_recall_curve(r.labels, r.prob)
            ax.plot(recall, precision, label=f"{r.classifier} (AP {r.pooled.values['average_precision']:.3f})")
        ax.axhline(group[0].labels.mean(), color="k", ls="--", lw=0.8)
        written.append(_save(plt, fig, ax, folder / f"pr_{target}.png", f"Precision-recall: {target}", "recall", "precision"))
        plt, fig, ax = _figure()
        for r in group:
            mean_p, frac, _ = metrics.reliability_curve(r.labels, r.prob)
            ax.plot(mean_p, frac, "o-", ms=3, label=f"{r.classifier} (ECE {r.pooled.values['ece']:.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        written.append(
            _save(plt, fig, ax, folder / f"reliability_{target}.png", f"Reliability: {target}", "mean predicted probability", "observed fraction abnormal")
        )
    return written


def plot_study(folder: str | Path, y: np.ndarray, arms: Sequence, shown: Sequence, target: str) -> list[Path]:
    """The study's two figures for ``study.Arm`` objects scored on the same rows ``y``."""
    from sklearn.metrics import roc_curve

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, pos = len(y), int(np.sum(y))
    plt, fig, ax = _figure()
    markers = {"youden": "o", "sens90": "^"}
    for a in arms:
        fpr, tpr, _ = roc_curve(y, a.prob)
        (line,) = ax.plot(fpr, tpr, label=f"{a.name} (AUC {a.values['roc_auc']:.3f})")
        for op, calls in a.decisions().items():
            d = metrics.decision_metrics(y, calls)
            ax.plot(1 - d["specificity"], d["sensitivity"], markers[op], color=line.get_color(), ms=6)
    for op, marker in markers.items():
        ax.plot([], [], marker, color="k", label=f"operating point: {op}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    roc = _save(plt, fig, ax, folder / f"study_roc_{target}.png",
                f"ROC: {target}, n = {n} ({pos} positive), same rows", "1 - specificity", "sensitivity")
    plt, fig, ax = _figure()
    for a in shown:
        mean_p, frac, _ = metrics.reliability_curve(y, a.prob)
        ax.plot(mean_p, frac, "o-", ms=3, label=f"{a.name} (ECE {a.values['ece']:.3f}, n = {n})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    rel = _save(plt, fig, ax, folder / f"study_reliability_{target}.png", f"Reliability: {target}, same rows",
                "mean predicted probability", "observed fraction abnormal")
    return [roc, rel]
