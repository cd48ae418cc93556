"""Self-contained HTML reports: tables and images embedded (base64), no external files or scripts."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .utils.io import atomic_write_text

__all__ = ["HtmlReport", "figure_png", "markdown_table"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2330}
h1{border-bottom:2px solid #3b6fd4;padding-bottom:.3em}h2{margin-top:1.8em;color:#2b4c8c}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}th,td{border:1px solid #ccd3e0;padding:.35em .7em;
text-align:right}th{background:#eef2fa}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ccd3e0}figcaption{font-size:.88em;color:#555}
.meta{color:#555;font-size:.9em}
"""


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table.

    Example:
        >>> print(markdown_table([{"a": 1, "b": 0.5}]))
        | a | b |
        |---|---|
        | 1 | 0.5 |
    """
    cols = list(columns or (rows[0].keys() if rows else []))
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _data_uri(img: bytes | np.ndarray | Image.Image | str | Path) -> str:
    """An image (PNG bytes, array, PIL image or file) as a ``data:image/png;base64`` URI."""
    if isinstance(img, str | Path):
        data = Path(img).read_bytes()
    elif isinstance(img, bytes):
        data = img
    else:
        pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


class HtmlReport:
    """Build a single-file HTML report.

    Example:
        >>> r = HtmlReport("Demo"); r.heading("Results"); r.table([{"metric": "acc", "value": 0.9}])
        >>> "<table>" in r.render()
        True
    """

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
        if subtitle:
            self.parts.append(f"<p class='meta'>{html.escape(subtitle)}</p>")

    def heading(self, text: str, level: int = 2) -> None:
        """Add a section heading."""
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str) -> None:
        """Add a paragraph of plain text."""
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
        """Add a table from a list of dicts."""
        cols = list(columns or (rows[0].keys() if rows else []))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows
        )
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, img: bytes | np.ndarray | Image.Image | str | Path, caption: str = "", alt: str = "") -> None:
        """Embed an image (PNG bytes, array, PIL image or file) as a data URI."""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f"<figure><img src='{_data_uri(img)}' alt='{html.escape(alt or caption)}'>{cap}</figure>")

    def gallery(self, items: Sequence[tuple[bytes | np.ndarray | Image.Image, str]], width: int = 256) -> None:
        """Add images side by side (wrapping), each with its caption, ``width`` pixels wide at most."""
        cells = []
        for img, caption in items:
            cells.append(f"<figure style='flex:0 1 {width}px;margin:0'><img src='{_data_uri(img)}' "
                         f"alt='{html.escape(caption)}' style='width:100%;max-width:{width}px'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        self.parts.append("<div style='display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start'>"
                          + "".join(cells) + "</div>")

    def render(self) -> str:
        """The whole HTML document."""
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body>{''.join(self.parts)}</body></html>")

    def save(self, path: str | Path) -> Path:
        """Write the report atomically."""
        return atomic_write_text(path, self.render())
