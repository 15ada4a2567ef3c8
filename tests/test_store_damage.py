"""A damaged or tampered store gives `Error: …` and exit 1 from every command that opens it, never a traceback.

One small store (40 rows, 3 shards, an errors file and a result part) is built once per module and
copied per case; each case damages one file in one way, then each command runs on it.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed.records import ReadFailure
from cxr_embed.store import MANIFEST, Store, StoreWriter, build_store_from_arrays

runner = CliRunner()
N, DIM = 40, 16


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(3)
    labels = np.arange(N) % 2
    emb = (rng.normal(size=(N, DIM)) + labels[:, None] * 1.5).astype(np.float32)
    rows = [
        {
            "image_id": f"i{i:03d}.png",
            "patient_id": f"p{i // 2:02d}",
            "label": int(labels[i]),
            "split": "train",
        }
        for i in range(N)
    ]
    path = tmp_path_factory.mktemp("damage") / "store"
    store = build_store_from_arrays(path, emb, rows, shard_size=16)
    with StoreWriter(
        path, model_id="synthetic", checkpoint_sha256="0" * 64, preprocess_fingerprint="synthetic", dim=DIM
    ) as w:
        w.record_failures([ReadFailure("bad.png", "/x/bad.png", "decode", "truncated")])
        w.finalize()
    run = pa.table(
        {
            "run_id": ["r0"],
            "kind": ["classify"],
            "created_at": [datetime.now(timezone.utc)],
            "params": ["{}"],
            "versions": ["{}"],
            "timings": ["{}"],
            "warnings": ["[]"],
        }
    )
    Store.open(path).write_results("runs", run)
    assert len(store) == N
    return path


def _manifest(store: Path) -> dict:
    return json.loads((store / MANIFEST).read_text())


def _shard(store: Path, i: int = 1) -> Path:
    return store / _manifest(store)["shards"][i]["file"]


def _rewrite_shard(store: Path, change) -> None:
    """Rewrite shard 1 as a valid Parquet file with one column changed (what a careless script would do)."""
    path = _shard(store)
    table = pq.read_table(path)
    name, values = change(table)
    pq.write_table(table.set_column(table.column_names.index(name), name, values), path)


def _garbage(path: Path, same_size: bool = True) -> None:
    size = path.stat().st_size if same_size else 77
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def _edit_counts(store: Path) -> None:
    manifest = _manifest(store)
    manifest["counts"]["rows"] += 5
    (store / MANIFEST).write_text(json.dumps(manifest))


def _manifest_dir(store: Path) -> None:
    (store / MANIFEST).unlink()
    (store / MANIFEST).mkdir()


def _lock_dir(store: Path) -> None:
    (store / ".lock").unlink(missing_ok=True)
    (store / ".lock").mkdir()


DAMAGE = {
    "truncated shard": lambda s: _shard(s).write_bytes(_shard(s).read_bytes()[:300]),
    "zero-byte shard": lambda s: _shard(s).write_bytes(b""),
    "garbage shard": lambda s: _garbage(_shard(s)),
    "permuted-embedding shard": lambda s: _rewrite_shard(
        s, lambda t: ("embedding", t.column("embedding").take(np.arange(16)[::-1]))
    ),
    "flipped-label shard": lambda s: _rewrite_shard(
        s, lambda t: ("label", pa.array(1 - t.column("label").to_numpy(), pa.int8()))
    ),
    "missing index": lambda s: (s / _manifest(s)["index"]["file"]).unlink(),
    "truncated index": lambda s: (s / _manifest(s)["index"]["file"]).write_bytes(
        (s / _manifest(s)["index"]["file"]).read_bytes()[:100]
    ),
    "edited counts": _edit_counts,
    "garbage store.json": lambda s: (s / MANIFEST).write_bytes(b'{"schema_version": 2, \x00garbage'),
    "store.json a directory": _manifest_dir,
    "garbage errors file": lambda s: _garbage(s / _manifest(s)["errors_file"]["file"], same_size=False),
    "garbage result file": lambda s: _garbage(
        s / _manifest(s)["results"]["runs"][0]["file"], same_size=False
    ),
    ".lock a directory": _lock_dir,
}

COMMANDS = {
    "search": ["search", "--id", "i003.png", "-k", "3"],
    "classify": [
        "classify",
        "--models",
        "lr",
        "--folds",
        "2",
        "--bootstrap",
        "0",
        "--no-refit",
        "--no-plots",
    ],
    "sql": ["sql", "SELECT count(*) AS n FROM images"],
    "store info": ["store", "info"],
    "store validate": ["store", "validate"],
}


@pytest.fixture(scope="module")
def damaged_stores(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind, damage in DAMAGE.items():
        dst = tmp_path_factory.mktemp("case") / "store"
        shutil.copytree(pristine, dst)
        damage(dst)
        out[kind] = dst
    return out


def test_the_pristine_store_passes_every_command(pristine: Path) -> None:
    for name, args in COMMANDS.items():
        if name == "classify":
            continue  # writes results into the store; the damaged cases show it opens the store first
        result = runner.invoke(app, [*args, "--store", str(pristine)])
        assert result.exit_code == 0, (name, result.output)


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_damage_gives_an_error_never_a_traceback(
    damaged_stores: dict[str, Path], kind: str, command: str
) -> None:
    result = runner.invoke(app, [*COMMANDS[command], "--store", str(damaged_stores[kind])])
    assert result.exit_code == 1, (kind, command, result.output, result.exception)
    assert "Error:" in result.stderr, (kind, command, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        kind,
        command,
        repr(result.exception),
    )


@pytest.mark.parametrize("kind", ["permuted-embedding shard", "flipped-label shard"])
def test_tampering_is_named_as_such(damaged_stores: dict[str, Path], kind: str) -> None:
    result = runner.invoke(app, ["sql", "SELECT count(*) FROM images", "--store", str(damaged_stores[kind])])
    assert "does not match its recorded checksum" in result.stderr or "is damaged" in result.stderr, (
        result.stderr
    )
    result = runner.invoke(app, ["store", "validate", "--store", str(damaged_stores[kind])])
    assert "To fix: rerun `cxr-embed index`" in result.stdout, result.stdout
