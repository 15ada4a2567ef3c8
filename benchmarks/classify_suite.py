"""Speed and quality of the five classifiers at ChestX-ray14 scale, beside exact sklearn.

Part 1 times ``crossval.cross_validate`` (the code ``cxr-embed classify`` runs: patient-grouped
stratified folds, held-out slice, operating points, bootstrap CI) for every classifier on
``--n`` x ``--dim`` clustered synthetic embeddings (``cohort.synthetic_cohort``; a linear model
reaches about 0.85 ROC-AUC at full size). Target: 5 classifiers x 5 folds in <= 10 minutes on 2 cores.

Part 0 (``--bootstrap-only``) times what the patient-clustered bootstrap adds per classifier at the
full row count without fitting anything: the pooled CIs of every metric (``--n-boot`` replicates,
patients resampled, two operating points) plus the per-fold ROC-AUC CIs (200 replicates x folds),
the exact calls ``cross_validate`` makes.

Part 2 compares, on a ``--subsample`` of the rows (patient-grouped 80/20 split), each classifier's
test ROC-AUC with the exact sklearn estimator it stands in for: ``SVC(probability=True)`` RBF
(gamma="scale", C=1), ``LogisticRegression`` (same C as ours picked), ``KNeighborsClassifier``
(same k), ``RandomForestClassifier`` (100 trees, raw features), ``MLPClassifier`` (128 hidden,
early stopping). Target: within 0.005.

    .venv/bin/python benchmarks/classify_suite.py                      # full size (slow)
    .venv/bin/python benchmarks/classify_suite.py --n 20000 --dim 256  # quick look
    .venv/bin/python benchmarks/classify_suite.py --bootstrap-only     # the CI cost at 112,120 rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings


def _limit_threads(threads: int) -> None:
    """Pin every thread pool (BLAS/OpenMP, torch, FAISS) to ``threads`` cores, as on a 2-core box."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def exact_sklearn(name: str, ours, seed: int):
    """The exact sklearn estimator ``name`` replaces, with our picked hyper-parameters where they exist."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    clf = ours.classifier
    return {
        "svm": lambda: SVC(kernel="rbf", gamma="scale", C=1.0, probability=True, random_state=seed),
        "lr": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=clf.C_, max_iter=1000)),
        "knn": lambda: KNeighborsClassifier(n_neighbors=clf.k_),
        "rf": lambda: RandomForestClassifier(n_estimators=100, n_jobs=-1, random_state=seed),
        "mlp": lambda: make_pipeline(StandardScaler(), MLPClassifier((128,), early_stopping=True, random_state=seed)),
    }[name]()


def time_bootstrap(labels, groups, n_folds: int, n_boot: int, seed: int) -> dict:
    """Seconds of the CI work ``cross_validate`` does for one classifier, on realistic scores."""
    import numpy as np

    from cxr_embed import metrics, stats

    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=np.int64)
    patient = rng.normal(0, 1, groups.max() + 1)[groups]
    p = 1 / (1 + np.exp(-(1.5 * y - 0.7 + 0.8 * patient + rng.normal(0, 1, y.size))))
    fold = rng.integers(0, n_folds, groups.max() + 1)[groups]
    ops = metrics.operating_points(y, p)
    t0 = time.perf_counter()
    pooled = stats.bootstrap_cis(y, p, clusters=groups, decisions=metrics.decisions_at(p, ops), n_boot=n_boot, seed=seed)
    t_pooled = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(n_folds):
        m = fold == k
        stats.auc_ci(y[m], p[m], clusters=groups[m], n_boot=200, seed=seed)
    t_folds = time.perf_counter() - t0
    image = stats.auc_ci(y, p, n_boot=200, seed=seed)
    print(f"bootstrap per classifier at {y.size} rows: pooled ({n_boot} replicates, {len(pooled)} metrics) "
          f"{t_pooled:.1f} s + per-fold AUC ({n_folds} x 200) {t_folds:.1f} s; ROC-AUC CI width by patient "
          f"{pooled['roc_auc'][1] - pooled['roc_auc'][0]:.4f} vs by image {image[1] - image[0]:.4f}", flush=True)
    return {"pooled_seconds": t_pooled, "fold_seconds": t_folds, "rows": int(y.size), "n_boot": n_boot}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=112_120, help="rows (default: ChestX-ray14's 112,120)")
    ap.add_argument("--dim", type=int, default=1024, help="embedding dimension (default 1024)")
    ap.add_argument("--subsample", type=int, default=10_000, help="rows for the exact-sklearn comparison (0 = skip)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--models", default="svm,lr,knn,rf,mlp")
    ap.add_argument("--separation", type=float, default=1.4, help="label signal of the synthetic cohort")
    ap.add_argument("--threads", type=int, default=2, help="cores to use (default 2, the target machine)")
    ap.add_argument("--skip-cv", action="store_true", help="only run the exact-sklearn comparison")
    ap.add_argument("--no-exact", action="store_true", help="subsample part: score ours only (exact SVC takes minutes)")
    ap.add_argument("--bootstrap-only", action="store_true", help="only time the patient-clustered bootstrap (part 0)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the pooled CIs (as classify)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    import numpy as np

    from cxr_embed import crossval as E
    from cxr_embed import metrics
    from cxr_embed import plans as P
    from cxr_embed.classifiers import parse_models
    from cxr_embed.cohort import synthetic_cohort

    _limit_threads(args.threads)
    warnings.filterwarnings("ignore", message="The `probability` parameter", category=FutureWarning)
    models = parse_models(args.models)
    out: dict = {"n": args.n, "dim": args.dim, "threads": args.threads, "cpu_count": os.cpu_count()}
    t0 = time.perf_counter()
    cohort = synthetic_cohort(args.n, args.dim, separation=args.separation, seed=args.seed)
    groups = P.group_ids(cohort.patients)
    print(f"cohort {args.n} x {args.dim}: {len(np.unique(groups))} patients, prevalence {cohort.labels.mean():.3f} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    if args.bootstrap_only:
        out["bootstrap"] = time_bootstrap(cohort.labels, groups, args.folds, args.n_boot, args.seed)
        args.skip_cv, args.subsample = True, 0

    if not args.skip_cv:
        t0 = time.perf_counter()
        folds = P.patient_group_folds(cohort.labels, groups, args.folds, args.seed)
        out["fold_seconds"] = time.perf_counter() - t0
        cv = {}
        for name in models:
            cpu = time.process_time()
            (r,) = E.cross_validate(cohort.embeddings, cohort.labels, groups, folds, [name], seed=args.seed,
                                    n_boot=args.n_boot)
            cpu = time.process_time() - cpu
            cv[name] = {"roc_auc": r.pooled.values["roc_auc"], "ci": r.pooled.auc_ci, "brier": r.pooled.values["brier"],
                        "seconds": r.seconds, "cpu_seconds": cpu}
            print(f"cv {name:4s} ROC-AUC {r.pooled.values['roc_auc']:.4f} [{r.pooled.auc_ci[0]:.4f}, {r.pooled.auc_ci[1]:.4f}] "
                  f"Brier {r.pooled.values['brier']:.4f}  wall {r.seconds:7.1f} s  cpu {cpu:7.1f} s", flush=True)
        total = out["fold_seconds"] + sum(v["seconds"] for v in cv.values())
        cpu_total = sum(v["cpu_seconds"] for v in cv.values())
        out["cv"], out["cv_total_seconds"], out["cv_cpu_seconds"] = cv, total, cpu_total
        print(f"cv total ({len(models)} classifiers x {args.folds} folds, folds included): wall {total:.1f} s "
              f"({total / 60:.2f} min; target <= 10 min); cpu {cpu_total:.1f} s (wall on a dedicated "
              f"{args.threads}-core box is about cpu / {args.threads} when the work parallelises)", flush=True)

    if args.subsample:
        rng = np.random.default_rng(args.seed)
        sub = np.sort(rng.choice(args.n, min(args.subsample, args.n), replace=False))
        X, y, g = cohort.embeddings[sub], cohort.labels[sub].astype(int), groups[sub]
        (fold, *_) = P.patient_group_folds(y, g, 5, args.seed)
        Xtr, ytr, Xte, yte = X[fold.train], y[fold.train], X[fold.test], y[fold.test]
        comparison = {}
        for name in models:
            t = time.perf_counter()
            ours = E.fit_model(name, Xtr, ytr, g[fold.train], seed=args.seed)
            auc_ours = metrics.roc_auc(yte, ours.predict_proba(Xte))
            t_ours = time.perf_counter() - t
            if args.no_exact:
                comparison[name] = {"ours": auc_ours, "ours_seconds": t_ours}
                print(f"subsample {len(sub)}: {name:4s} ours {auc_ours:.4f} ({t_ours:6.1f} s)", flush=True)
                continue
            t = time.perf_counter()
            # like for like: sklearn fits on the rows ours fitted on (ours kept a held-out slice of the
            # training patients for tuning/calibration/thresholds; SVC does its Platt CV internally)
            fit_rows, _ = P.holdout_slice(ytr, g[fold.train], seed=args.seed)
            ref = exact_sklearn(name, ours, args.seed).fit(Xtr[fit_rows], ytr[fit_rows])
            auc_ref = metrics.roc_auc(yte, ref.predict_proba(Xte)[:, 1])
            t_ref = time.perf_counter() - t
            comparison[name] = {"ours": auc_ours, "sklearn": auc_ref, "diff": auc_ours - auc_ref,
                                "ours_seconds": t_ours, "sklearn_seconds": t_ref}
            print(f"subsample {len(sub)}: {name:4s} ours {auc_ours:.4f} ({t_ours:6.1f} s)  exact sklearn {auc_ref:.4f} "
                  f"({t_ref:6.1f} s)  diff {auc_ours - auc_ref:+.4f}", flush=True)
        out["subsample"] = {"rows": len(sub), "train": len(fold.train), "test": len(fold.test), "models": comparison}
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(out, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
