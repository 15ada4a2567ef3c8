"""The table and Markdown report of ``cxr-embed reproduce``: each measured figure beside the published one.

Kept apart from :mod:`cxr_embed.reproduce` (which runs the steps) because it only reads the steps'
JSON summaries: a report can be re-rendered from ``reproduce.json`` without running anything.
"""

from __future__ import annotations

from typing import Any

#: The published figures each check is compared with (the seed study; see the README).
PUBLISHED = {
    "svm_cv_roc_auc": "0.82-0.83 (seed check); 0.8277",
    "svm_brier": "0.168",
    "finetuned_roc_auc": "0.888",
    "finetuned_brier": "0.137",
    "sweep_best": "lr 1e-05, weight decay 0.2",
}


def _fmt(value: Any, ci: Any = None) -> str:
    if value is None or value != value:
        return "n/a"
    text = f"{value:.4f}"
    if ci and all(c is not None and c == c for c in ci):
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def _arm(table: list[dict[str, Any]], arm: str, classifier: str | None = None) -> dict[str, Any] | None:
    return next(
        (r for r in table if r["arm"] == arm and (classifier is None or r["classifier"] == classifier)), None
    )


def comparison_rows(steps: dict[str, Any]) -> list[dict[str, str]]:
    """``check``, ``measured`` (95% CI, patients resampled), ``published`` per figure."""
    rows = []
    cv = steps.get("svm_cv", {})
    rows.append(
        {
            "check": "1. SVM, 5-fold CV: ROC-AUC",
            "measured": _fmt(cv.get("roc_auc"), cv.get("roc_auc_ci")),
            "published": PUBLISHED["svm_cv_roc_auc"],
        }
    )
    rows.append(
        {
            "check": "1. SVM, 5-fold CV: Brier",
            "measured": _fmt(cv.get("brier"), cv.get("brier_ci")),
            "published": PUBLISHED["svm_brier"],
        }
    )
    sweep = steps.get("sweep", {})
    sel = sweep.get("selected")
    rows.append(
        {
            "check": "2. fine-tuning sweep: selected cell (validation ROC-AUC)",
            "measured": f"lr {sel['lr']:g}, weight decay {sel['weight_decay']:g}" if sel else "n/a",
            "published": PUBLISHED["sweep_best"],
        }
    )
    table = steps.get("study", {}).get("table", [])
    tuned, svm = _arm(table, "finetuned"), _arm(table, "frozen", "svm")
    for label, row, auc_pub, brier_pub in (
        ("fine-tuned", tuned, PUBLISHED["finetuned_roc_auc"], PUBLISHED["finetuned_brier"]),
        ("SVM", svm, PUBLISHED["svm_cv_roc_auc"].split("; ")[-1], PUBLISHED["svm_brier"]),
    ):
        rows.append(
            {
                "check": f"3. hold-out test rows, {label}: ROC-AUC",
                "measured": _fmt(row and row["roc_auc"], row and row["roc_auc_ci"]),
                "published": auc_pub,
            }
        )
        rows.append(
            {
                "check": f"3. hold-out test rows, {label}: Brier",
                "measured": _fmt(row and row["brier"], row and row["brier_ci"]),
                "published": brier_pub,
            }
        )
    if tuned and tuned.get("delong_p") is not None:
        rows.append(
            {
                "check": "3. fine-tuned vs reference: AUC difference (DeLong p)",
                "measured": f"{_fmt(tuned['auc_diff_vs_ref'], tuned['auc_diff_ci'])} (p = {tuned['delong_p']:.3g})",
                "published": "fine-tuned ahead (0.888 vs 0.8277)",
            }
        )
    zs = steps.get("holdout", {}).get("zeroshot", {})
    rows.append(
        {
            "check": "zero-shot (text prompts, Platt in training rows): ROC-AUC",
            "measured": _fmt(zs.get("roc_auc"), zs.get("roc_auc_ci")),
            "published": "none for this model (ELIXR: 0.850 mean over 13 findings)",
        }
    )
    for r in steps.get("search_eval", {}).get("rows", []):
        if r["index_kind"] == "exact" and r["target"] == "abnormal" and r["k"] == 5:
            rows.append(
                {
                    "check": f"retrieval, exact, abnormal: {r['metric']}@5",
                    "measured": _fmt(r["value"], (r["ci_low"], r["ci_high"])),
                    "published": "none for this model (ELIXR nDCG 0.76; BiomedCLIP P@1 0.594)",
                }
            )
    return rows


def render(config, steps: dict[str, Any], figures: list[str]) -> str:
    """The Markdown report: settings, the comparison table, per-step details, the figures."""
    lines = [
        "# cxr-embed reproduce",
        "",
        f"Data: `{config.data}`; sample {config.sample:,}; fine-tuning grid lr {list(config.lrs)} x weight decay "
        f"{list(config.weight_decays)}, {config.epochs} epoch(s); {config.n_boot} patient-clustered bootstrap "
        "replicates for every 95% CI.",
        "",
        "## Measured vs published",
        "",
        "| check | measured (95% CI) | published |",
        "|---|---|---|",
    ]
    lines += [f"| {r['check']} | {r['measured']} | {r['published']} |" for r in comparison_rows(steps)]
    holdout = steps.get("holdout", {})
    if holdout.get("plan"):
        lines += ["", f"Hold-out plan: {holdout['plan']}."]
    for target, scores in holdout.get("prompts", {}).items():
        lines += ["", f"## Zero-shot prompts ({target})", "", "| prompt | ROC-AUC |", "|---|---|"]
        lines += [f"| {p} | {_fmt(v)} |" for p, v in scores.items()]
    cells = steps.get("sweep", {}).get("cells", [])
    if cells:
        lines += [
            "",
            "## Fine-tuning sweep (validation rows only)",
            "",
            "| lr | weight decay | status | val ROC-AUC | val Brier | selected |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['lr']:g} | {c['weight_decay']:g} | {c['status']} | {_fmt(c['val_roc_auc'])} | "
            f"{_fmt(c['val_brier'])} | {'yes' if c['selected'] else ''} |"
            for c in cells
        ]
    timing = {name: s.get("seconds") for name, s in steps.items() if isinstance(s, dict)}
    lines += [
        "",
        "## Time per step (s)",
        "",
        " · ".join(f"{k} {v}" for k, v in timing.items() if v is not None),
    ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
