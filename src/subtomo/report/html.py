"""A self-contained one-page HTML report: key values, tables and PNGs embedded as base64."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from subtomo.io import atomic_path

__all__ = ["write_html_report"]

_STYLE = (
    "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left}th{background:#f0f0f0}img{max-width:100%;display:block;margin:1em 0}"
    ".warn{color:#a40}"
)


def _table(rows: Mapping[str, object]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def write_html_report(
    path: str | os.PathLike,
    title: str,
    summary: Mapping[str, object],
    images: Sequence[str | os.PathLike] = (),
    *,
    warnings: Sequence[str] = (),
    notes: str = "",
    fragments: Sequence[str] = (),
) -> Path:
    """Write ``path``: a title, a key/value table, warnings, notes, ``fragments`` (HTML the
    caller built and escaped, e.g. tables with links) and the PNG ``images`` (embedded, so the
    file stands alone). Returns the path."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _table(summary),
    ]
    parts += [f"<p class='warn'>Warning: {html.escape(w)}</p>" for w in warnings]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    parts += fragments
    for img in images:
        data = base64.b64encode(Path(img).read_bytes()).decode("ascii")
        alt = html.escape(Path(img).name)
        parts.append(f"<img alt='{alt}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts), encoding="utf-8")
    return path
