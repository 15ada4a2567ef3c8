"""SQL views that give one answer: the latest run per arm/classifier/target/plan, and the latest study.

Why: the raw ``metrics`` and ``predictions`` tables keep every run ever made (that is the audit
trail), so ``max(value) ... GROUP BY classifier`` over them reports the best of several seeds and
a plain ``WHERE metric = 'roc_auc'`` returns one row per run. These views pick, for every
``(arm, classifier, target, plan_id)``, the run that was made last; ``study`` is the table of the
latest ``cxr-embed study``. ``Store.connect`` registers them after the raw result views.
"""

from __future__ import annotations

#: The run of each (arm, classifier, target, plan) that started last (a run's first ``runs`` row).
_LATEST_RUN = """
    SELECT t.arm, t.classifier, t.target, t.plan_id, arg_max(t.run_id, r.created_at) AS run_id
    FROM (SELECT DISTINCT arm, classifier, target, plan_id, run_id FROM {table}) AS t
    JOIN (SELECT run_id, min(created_at) AS created_at FROM runs GROUP BY run_id) AS r USING (run_id)
    GROUP BY t.arm, t.classifier, t.target, t.plan_id
"""

_LATEST_OF = """
    SELECT t.* FROM {table} AS t
    JOIN ({latest}) AS l
      ON t.run_id = l.run_id AND t.arm = l.arm AND t.classifier = l.classifier AND t.target = l.target
     AND t.plan_id IS NOT DISTINCT FROM l.plan_id
"""

VIEWS: dict[str, str] = {
    "latest_predictions": _LATEST_OF.format(
        table="predictions", latest=_LATEST_RUN.format(table="predictions")
    ),
    "latest_metrics": _LATEST_OF.format(table="metrics", latest=_LATEST_RUN.format(table="metrics")),
    "study": "SELECT * FROM studies WHERE study_id = (SELECT arg_max(study_id, created_at) FROM studies)",
}


def register_result_views(con) -> None:
    """Create :data:`VIEWS` on a DuckDB connection that already has the raw result views."""
    for name, body in VIEWS.items():
        con.execute(f"CREATE VIEW {name} AS {body}")
