"""A self-contained HTML page: inline CSS, images as base64 data URIs, no scripts, no outside requests."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


def esc(text: object) -> str:
    """Text made safe for HTML (run names, item ids and config values come from users' files)."""
    return html.escape(str(text), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, css_class: str = "") -> str:
    """An embedded PNG; `alt` says what it shows for readers who cannot see it."""
    cls = f' class="{css_class}"' if css_class else ""
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}"{cls}>'


def img_file(path: Path, alt: str, css_class: str = "") -> str:
    """An embedded PNG file, or a plain note when the file is missing."""
    try:
        return img(path.read_bytes(), alt, css_class)
    except OSError:
        return f'<span class="missing">({esc(path.name)} missing)</span>'


def table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[int] = (),
          caption: str | None = None, raw: bool = False) -> str:
    """A table; columns listed in `numeric` are right-aligned. Cells are escaped unless `raw`."""
    cell = (lambda v: str(v)) if raw else esc
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{esc(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{cell(v)}</td>'
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<div class="tbl"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


@dataclass
class Section:
    """One part of the report: an anchor, a heading and its HTML body."""

    anchor: str
    title: str
    body: str


CSS = """
:root { --ink: #1a1a1a; --muted: #5f6368; --rule: #d0d4d9; --accent: #0b4f8a; --bad: #a3160e; --good: #1e6b35; }
* { box-sizing: border-box; }
body { font-family: "Helvetica Neue", Arial, "Liberation Sans", sans-serif; color: var(--ink); margin: 0;
       line-height: 1.45; font-size: 15px; background: #fff; }
main { max-width: 1060px; margin: 0 auto; padding: 28px 32px 60px; }
header.title { border-bottom: 3px solid var(--accent); padding-bottom: 12px; margin-bottom: 18px; }
header.title h1 { margin: 0 0 4px; font-size: 26px; color: var(--accent); }
header.title p { margin: 2px 0; color: var(--muted); }
h2 { font-size: 20px; color: var(--accent); border-bottom: 1px solid var(--rule); padding-bottom: 4px;
     margin-top: 34px; }
h3 { font-size: 16px; margin: 20px 0 6px; }
nav.toc { background: #f5f7fa; border: 1px solid var(--rule); padding: 10px 16px; font-size: 14px; }
nav.toc ol { margin: 4px 0; padding-left: 22px; columns: 2; }
a { color: var(--accent); }
p.lead { font-size: 16px; }
ul.findings li { margin: 6px 0; }
.muted, caption, .note { color: var(--muted); font-size: 13px; }
div.tbl { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13.5px; width: auto; }
caption { text-align: left; caption-side: top; padding-bottom: 4px; }
th, td { border-bottom: 1px solid var(--rule); padding: 4px 10px; text-align: left; vertical-align: middle; }
th { background: #eef2f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.high { background: #fbe3e1; color: var(--bad); } .medium { background: #fdf0d5; color: #8a5300; }
.low { background: #e3f1e6; color: var(--good); }
figure { margin: 10px 0 18px; }
figure img.plot { max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
img.grid { image-rendering: pixelated; width: 100%; max-width: 720px; height: auto; }
img.px { image-rendering: pixelated; width: 64px; height: 64px; border: 1px solid var(--rule); }
.pairs { display: flex; flex-wrap: wrap; gap: 12px; }
.pair { border: 1px solid var(--rule); padding: 6px; text-align: center; font-size: 12px; width: 158px; }
.pair div.imgs { display: flex; gap: 4px; justify-content: center; }
.pair span.tag { display: block; color: var(--muted); }
pre { background: #f5f7fa; border: 1px solid var(--rule); padding: 8px; font-size: 12px; white-space: pre-wrap;
      word-break: break-all; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; font-size: 14px; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; }
.missing { color: var(--muted); font-style: italic; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--rule); padding-top: 8px; }
@media print {
  @page { size: A4; margin: 14mm 12mm; }
  body { font-size: 11pt; }
  main { max-width: none; padding: 0; }
  nav.toc { display: none; }
  a { color: inherit; text-decoration: none; }
  h2 { break-before: auto; break-after: avoid; }
  h3 { break-after: avoid; }
  table, figure, .pair, dl.kv { break-inside: avoid; }
  div.tbl { overflow: visible; }
  table { font-size: 8.5pt; }
  th { background: #eee !important; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  .pill { border: 1px solid #888; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  pre { white-space: pre-wrap; }
}
"""


def page(title: str, subtitle: Sequence[str], sections: Sequence[Section], footer: str) -> str:
    """The whole report as one HTML document."""
    toc = "".join(f'<li><a href="#{esc(s.anchor)}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{esc(s.anchor)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    lines = "".join(f"<p>{esc(line)}</p>" for line in subtitle)
    # The CSP keeps a viewer from fetching anything, whatever ends up in the page.
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<main>
<header class="title"><h1>{esc(title)}</h1>{lines}</header>
<nav class="toc"><strong>Contents</strong><ol>{toc}</ol></nav>
{body}
<footer>{esc(footer)}</footer>
</main>
</body>
</html>
"""
