"""Peak memory of `cxr-embed sql` writing a large result (issue 15: JSON on 5M rows took 4.3 GB).

Runs the real CLI in a subprocess over a small synthetic store and reads the child's peak RSS
(``ru_maxrss``) after it exits. The query makes rows with an int, a float, a float32 and a text column,
so the result size does not depend on the store. Target: < 500 MB for 5M rows in every format.

    .venv/bin/python benchmarks/sql_memory.py --rows 5000000 --formats json csv parquet
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUERY = (
    "SELECT i AS row_id, i * 0.001 AS score, (i % 997)::FLOAT AS similarity, "
    "'img_' || lpad(i::VARCHAR, 8, '0') || '.png' AS image_id FROM range({rows}) t(i)"
)


def make_store(path: Path) -> None:
    import numpy as np

    from cxr_embed.store import build_store_from_arrays

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(16, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = [
        {"image_id": f"{i}.png", "patient_id": str(i), "path": f"/x/{i}.png", "label": i % 2}
        for i in range(16)
    ]
    build_store_from_arrays(path, emb, rows)


def measure(store: Path, rows: int, fmt: str, out_dir: Path) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, output bytes) of one CLI run in a fresh process."""
    out = out_dir / f"result.{fmt}"
    cmd = [sys.executable, "-m", "cxr_embed_cli.main", "sql", "--store", str(store), QUERY.format(rows=rows),
           "--format", fmt, "--out", str(out), "--timeout", "3600"]  # fmt: skip
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: exec the CLI so ru_maxrss is its own
        os.execv(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{fmt}: the CLI failed (exit {os.waitstatus_to_exitcode(status)})")
    return usage.ru_maxrss / 1024, seconds, out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--formats", nargs="+", default=["json", "jsonl", "csv", "tsv", "parquet"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store)
        base = subprocess.run(
            [sys.executable, "-c", "import resource, cxr_embed_cli.main, duckdb, pyarrow; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        print(f"rows={args.rows:,}  baseline (imports only) peak RSS {float(base):.0f} MiB")
        for fmt in args.formats:
            peak, seconds, size = measure(store, args.rows, fmt, Path(tmp))
            print(f"{fmt:8s} peak RSS {peak:6.0f} MiB  {seconds:6.1f} s  output {size / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
