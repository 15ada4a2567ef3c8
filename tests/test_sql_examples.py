"""Every SQL example the README and the demo print runs against a demo store (so none goes stale).

Examples that only show a refusal (``COPY``/writes) are checked to be refused; a ``neighbors()``
example gets an image id that exists in the demo store.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cxr_embed.demo import example_queries
from cxr_embed.errors import CxrEmbedError
from cxr_embed.sql import QueryTimeout, run_query
from cxr_embed.store import Store

README = Path(__file__).resolve().parents[1] / "README.md"
SQL_COMMAND = re.compile(r'cxr-embed sql --store \S+ "((?:[^"\\]|\\.)*)"', re.DOTALL)
pytestmark = pytest.mark.slow  # shares the demo fixture (about a minute of CPU once per session)


def readme_examples() -> list[str]:
    """The queries of every ``cxr-embed sql --store S "..."`` in the README (continuation lines joined)."""
    text = README.read_text(encoding="utf-8")
    return [" ".join(m.group(1).split()) for m in SQL_COMMAND.finditer(text) if "…" not in m.group(1)]


def test_the_readme_has_sql_examples_using_the_one_answer_views() -> None:
    examples = readme_examples()
    assert len(examples) >= 4
    for sql in examples:  # results are read through the views that pick the latest run
        assert not re.search(r"\bFROM (metrics|predictions)\b", sql), sql


def test_every_readme_and_demo_example_runs_on_the_demo_store(demo_run) -> None:
    store = Store.open(demo_run.store)
    query_id = demo_run.result["search"][0]["query"]
    demo = [sql for _, sql in example_queries(query_id)]
    for sql in readme_examples() + demo:
        sql = re.sub(r"neighbors\('[^']*'", f"neighbors('{query_id}'", sql)
        if re.match(r"\s*(EXPLAIN\s+(ANALYZE\s+)?)?(COPY|INSERT|CREATE|ATTACH)\b", sql, re.IGNORECASE):
            with pytest.raises(CxrEmbedError):
                run_query(store, sql)
            continue
        if "range(1e12" in sql:  # the README's runaway query: it must stop at its --timeout
            with pytest.raises(QueryTimeout):
                run_query(store, sql, timeout_s=2)
            continue
        table = run_query(store, sql)
        if not re.search(r"\bFROM (errors|sweep)\b", sql):  # the demo's images all decode and it runs no sweep
            assert table.num_rows > 0, sql
