"""The case-lookup page at ``/``: one server-rendered HTML form, no JavaScript, no build step.

Upload an image (or type a finding) and the page shows the triage answer and the similar stored
cases with their labels. Thumbnails appear only when the data owner starts the server with
``--link-file`` (a CSV or Parquet file with ``image_id`` and ``path`` columns mapping the store's
pseudonymous ids to image files they hold): without it the server has no way to, and must not,
show stored images. Thumbnails are inlined as small JPEG data URIs, so the page needs no second,
separately authenticated request. With API keys on, the form asks for a key.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from cxr_embed.errors import ConfigError
from cxr_embed.serve.uploads import read_uploads

if TYPE_CHECKING:
    from cxr_embed.serve.service import Service

THUMB_SIZE = 128

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:64rem;color:#222}
h1{font-size:1.4rem} table{border-collapse:collapse;margin:1rem 0} td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}
.abstain{color:#a40} .abnormal{color:#b00;font-weight:bold} .normal{color:#070} form{background:#f6f6f6;padding:1rem}
label{display:block;margin:.4rem 0} img{display:block}
"""


def load_link_file(path: Path | None) -> dict[str, str]:
    """image_id -> image path from a CSV or Parquet link file (empty without one)."""
    if path is None:
        return {}
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--link-file {p} does not exist.")
    table = pq.read_table(p) if p.suffix.lower() == ".parquet" else pcsv.read_csv(p)
    missing = [c for c in ("image_id", "path") if c not in table.column_names]
    if missing:
        raise ConfigError(f"--link-file {p} lacks column(s) {missing}; it needs image_id and path.")
    return dict(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist(), strict=True))


def thumbnail(path: str) -> str | None:
    """A small JPEG data URI of a linked image, None when it cannot be read."""
    from cxr_embed.imageio import read_image

    try:
        img = read_image(path)
    except Exception:  # noqa: BLE001 - a missing linked file only costs its thumbnail
        return None
    img.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buf = io.BytesIO()
    img.convert("L").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _form(need_key: bool, k: int) -> str:
    key = '<label>API key <input type="password" name="key" required></label>' if need_key else ""
    return f"""<form method="post" action="/lookup" enctype="multipart/form-data">{key}
<label>Chest X-ray (DICOM, PNG or JPEG) <input type="file" name="file" id="file"></label>
<label>or a finding <input type="text" name="text" id="text" placeholder="pleural effusion"></label>
<label>neighbours <input type="number" name="k" value="{k}" min="1" max="50"></label>
<button type="submit" id="go">Look up</button></form>"""


def _page(body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>cxr-embed case lookup</title>"
        f"<style>{_STYLE}</style></head><body><h1>cxr-embed case lookup</h1>{body}</body></html>"
    )


def _neighbors_table(neighbors: list[dict[str, Any]], thumbs: dict[str, str | None]) -> str:
    show = any(thumbs.values())
    head = (
        "<tr>" + ("<th>image</th>" if show else "") + "<th>rank</th><th>similarity</th><th>image id</th>"
        "<th>label</th><th>findings</th><th>view</th></tr>"
    )
    rows = []
    for n in neighbors:
        thumb = thumbs.get(n["image_id"])
        img = f'<img alt="thumbnail" src="{thumb}">' if thumb else ""
        cell = f"<td>{img}</td>" if show else ""
        label = {1: "abnormal", 0: "normal"}.get(n["label"], "unknown")
        findings = ", ".join(n["findings"] or []) or "—"
        rows.append(
            f"<tr class='neighbor'>{cell}<td>{n['rank']}</td><td>{n['similarity']:.3f}</td>"
            f"<td>{html.escape(str(n['image_id']))}</td><td class='{label}'>{label}</td>"
            f"<td>{html.escape(findings)}</td><td>{html.escape(str(n['view'] or ''))}</td></tr>"
        )
    return f"<table id='neighbors'>{head}{''.join(rows)}</table>"


def _result_html(item: dict[str, Any], thumbs: dict[str, str | None]) -> str:
    if item.get("abstain"):
        reason = item.get("reason") or {}
        verdict = (
            f"<p class='abstain' id='verdict'>No decision (abstain): {html.escape(reason.get('code', ''))} — "
            f"{html.escape(reason.get('detail', ''))}</p>"
        )
    elif item.get("decisions"):
        calls = ", ".join(
            f"<span class='{'abnormal' if v else 'normal'}'>{html.escape(k)}: {'abnormal' if v else 'normal'}"
            f"</span>"
            for k, v in item["decisions"].items()
        )
        verdict = f"<p id='verdict'>Probability of abnormal {item['probability']:.3f} — {calls}</p>"
    elif item.get("probability") is not None:
        verdict = f"<p id='verdict'>kNN-vote probability of abnormal {item['probability']:.3f} (no classifier served)</p>"
    else:
        verdict = "<p id='verdict'>Similar cases</p>"
    table = _neighbors_table(item.get("neighbors", []), thumbs) if item.get("neighbors") else ""
    return f"<section id='result'><h2>Result</h2>{verdict}{table}</section>"


def add_page_routes(app: FastAPI, svc: Service) -> None:
    links = load_link_file(svc.config.link_file)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return _page(_form(svc.keys is not None, svc.config.k))

    @app.post("/lookup", response_class=HTMLResponse, include_in_schema=False)
    async def lookup(request: Request) -> HTMLResponse:
        from cxr_embed.serve.service import neighbor_json, triage_uploads

        rec = request.state.audit
        files, fields = await read_uploads(request, max_bytes=svc.config.max_bytes, max_files=1)
        try:
            rec.key_id = svc.authenticate(fields.get("key") or None)
        except HTTPException:
            return HTMLResponse(
                _page(
                    "<p class='abstain' id='verdict'>Unknown or revoked API key.</p>"
                    + _form(True, svc.config.k)
                ),
                status_code=401,
            )
        try:
            k = max(1, min(50, int(fields.get("k") or svc.config.k)))
        except ValueError:
            k = svc.config.k
        text = (fields.get("text") or "").strip()
        if files:
            item = (await triage_uploads(svc, rec, files[:1], k, None))[0]
        elif text:
            rec.input_kind, rec.inputs = "text", 1
            loop = asyncio.get_running_loop()
            result = (await loop.run_in_executor(svc.engine.executor, svc.engine.search_texts, [text], k))[0]
            item = {"abstain": False, "neighbors": [neighbor_json(n) for n in result.neighbors]}
        else:
            return HTMLResponse(
                _page(
                    "<p id='verdict'>Choose an image or type a finding.</p>"
                    + _form(svc.keys is not None, svc.config.k)
                ),
                status_code=400,
            )
        ids = [n["image_id"] for n in item.get("neighbors", []) if n["image_id"] in links]
        thumbs = dict(
            zip(ids, await run_in_threadpool(lambda: [thumbnail(links[i]) for i in ids]), strict=True)
        )
        return HTMLResponse(_page(_result_html(item, thumbs) + _form(svc.keys is not None, svc.config.k)))
