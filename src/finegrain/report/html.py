"""Small helpers that write the report's self-contained HTML: escaping, inline PNGs, tables, the page."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence

from PIL import Image

esc = html.escape


def img_tag(png: bytes, alt: str, *, cls: str = "", width: int | None = None) -> str:
    """An ``<img>`` holding ``png`` as a base64 data URI (no file or network access needed)."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("img_tag expects PNG bytes")
    data = base64.b64encode(png).decode("ascii")
    attrs = f' class="{esc(cls)}"' if cls else ""
    attrs += f' width="{width}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}"{attrs}>'


def pil_png(img: Image.Image) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def table(headers: Sequence[str], rows: Iterable[Sequence], *, sortable: bool = False, numeric: Sequence[bool] = ()) -> str:
    """An HTML table; cells are escaped. ``sortable`` tables sort on a header click (inline script).

    A cell may be a ``(text, sort_key)`` pair so that e.g. "95.0%" sorts as a number.
    """
    cls = ' class="sortable"' if sortable else ""
    head = "".join(
        f'<th{" class=num" if i < len(numeric) and numeric[i] else ""}>{esc(str(h))}</th>' for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text, key = cell if isinstance(cell, tuple) else (cell, None)
            num = " class=num" if i < len(numeric) and numeric[i] else ""
            data = f' data-sort="{esc(str(key))}"' if key is not None else ""
            cells.append(f"<td{num}{data}>{esc(str(text))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde1e8; --accent: #2f6fde; --bad: #c0392b; --good: #1e8449; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0; background: #f6f7f9; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 18px 32px 10px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
nav { margin-top: 8px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; font-size: 13px; }
main { max-width: 1280px; margin: 0 auto; padding: 8px 32px 48px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 20px 18px; margin: 18px 0; }
section h2 { margin: 0 0 10px; font-size: 18px; }
p.note, .muted { color: var(--muted); }
img { max-width: 100%; height: auto; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; }
.kpi { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.kpi b { display: block; font-size: 22px; }
.kpi span { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th:hover { color: var(--accent); }
.scroll { max-height: 520px; overflow-y: auto; display: inline-block; vertical-align: top; margin-right: 24px; }
.pair { display: flex; gap: 18px; align-items: flex-start; border-top: 1px solid var(--line); padding: 10px 0; }
.pair .side { flex: 1; }
.pair h3 { font-size: 13px; margin: 0 0 6px; }
.thumbs img { width: 104px; height: 104px; margin: 0 4px 4px 0; border-radius: 3px; }
.thumbs.bad img { outline: 3px solid var(--bad); outline-offset: -3px; }
.explain { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 14px; }
.explain figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
.explain figure.wrong { border-color: var(--bad); }
.explain figcaption { font-size: 12px; margin-top: 4px; }
.ok { color: var(--good); font-weight: 600; }
.no { color: var(--bad); font-weight: 600; }
pre { background: #f3f4f7; border: 1px solid var(--line); border-radius: 6px; padding: 10px; font-size: 12px; overflow-x: auto; }
.columns { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.columns > div { flex: 1; min-width: 320px; }
"""

# Sorting is progressive enhancement: the tables are already sorted, this only lets a reader re-sort.
_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (t) {
  t.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
      function key(r) { var c = r.cells[col], k = c.dataset.sort !== undefined ? c.dataset.sort : c.textContent;
                        var n = parseFloat(k); return isNaN(n) ? k.toLowerCase() : n; }
      rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
window.addEventListener('load', function () {
  document.documentElement.setAttribute('data-page-height', String(document.documentElement.scrollHeight));
});
"""


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: ``sections`` are ``(id, heading, inner html)``."""
    nav = "".join(f'<a href="#{esc(sid)}">{esc(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(f'<section id="{esc(sid)}"><h2>{esc(head)}</h2>\n{inner}\n</section>' for sid, head, inner in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>"
        f"<header><h1>{esc(title)}</h1><div class=\"muted\">{subtitle}</div><nav>{nav}</nav></header>\n"
        f"<main>\n{body}\n</main><script>{_SCRIPT}</script></body></html>\n"
    )
