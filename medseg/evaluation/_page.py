"""Self-contained HTML pages: inline CSS, a small sorting script, tables and embedded PNGs.

Pages written with :func:`page` load nothing from the network: images are ``data:``
URIs, style and script are inline. A table made with ``sortable=True`` sorts by a
column when its header is clicked (numbers as numbers, undefined values last in both
directions); ``#sort=KEY`` or ``#sort=KEY:asc`` in the address sorts on load, which is
how a browser test can check the script without clicking.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any, Sequence

__all__ = ["page", "table", "cell", "img", "fmt", "esc"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
 color:#212529;background:#fff;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.25em;margin-top:32px;border-bottom:1px solid #dee2e6}
h3{font-size:1.05em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #dee2e6;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f1f3f5;position:sticky;top:0}
td:first-child,th:first-child{text-align:left}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}
table.sortable th[data-dir=desc]::after{content:" \\25BC"}
tr.bad td{background:#fff5f5}
td.nan{color:#adb5bd}
.meta{color:#495057;font-size:13px}.meta code{font-size:12px}
.scroll{overflow-x:auto;max-height:640px;overflow-y:auto}
.wide{overflow-x:auto;max-width:100%}
td:first-child{white-space:normal;overflow-wrap:anywhere;min-width:6em;max-width:24em}
td.text{white-space:normal;overflow-wrap:anywhere;text-align:left;min-width:10em}
table.sortable td:first-child{position:sticky;left:0;background:#fff}
table.sortable tr.bad td:first-child{background:#fff5f5}
table.sortable th:first-child{left:0;z-index:2}
figure{margin:16px 0;border:1px solid #e9ecef;padding:8px}
figure img{max-width:100%}
figcaption{font-size:13px;color:#343a40;overflow-wrap:anywhere}
@media print{.scroll,.wide{max-height:none;overflow:visible}th,table.sortable td:first-child{position:static}
 th,td{white-space:normal;padding:1px 4px}table{font-size:9px}figure{break-inside:avoid}}
.legend{font-weight:600}
.better{color:#2b8a3e}.worse{color:#c92a2a}
"""

_SORT_JS = """
(function(){
  function key(td){var v=td.getAttribute('data-v');if(v===null)v=td.textContent;
    var x=parseFloat(v);return {num:!isNaN(x)&&isFinite(v),x:x,s:v,none:(v===''||v==='nan'||v==='NaN')};}
  function sortBy(table,col,dir){
    var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    var ths=table.tHead.rows[0].cells;
    for(var i=0;i<ths.length;i++)ths[i].removeAttribute('data-dir');
    ths[col].setAttribute('data-dir',dir);
    var s=dir==='asc'?1:-1;
    rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
      if(x.none||y.none)return (x.none?1:0)-(y.none?1:0);
      if(x.num&&y.num)return s*(x.x-y.x);return s*x.s.localeCompare(y.s);});
    rows.forEach(function(r){body.appendChild(r);});
  }
  var tables=document.querySelectorAll('table.sortable');
  Array.prototype.forEach.call(tables,function(table){
    var ths=table.tHead.rows[0].cells;
    Array.prototype.forEach.call(ths,function(th,col){
      th.title='click to sort';
      th.addEventListener('click',function(){
        sortBy(table,col,th.getAttribute('data-dir')==='asc'?'desc':'asc');});
    });
    var m=/sort=([^:&]+)(?::(asc|desc))?/.exec(decodeURIComponent(location.hash));
    if(m){for(var i=0;i<ths.length;i++){if(ths[i].getAttribute('data-key')===m[1]){sortBy(table,i,m[2]||'desc');}}}
    table.setAttribute('data-sortable','ready');
  });
  // printed, the collapsed sections (conventions, other metrics) come out too
  window.addEventListener('beforeprint',function(){
    Array.prototype.forEach.call(document.querySelectorAll('details'),function(d){d.open=true;});});
})();
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A value for a table cell: integers as such, floats with ``digits`` significant digits
    (more where those would show a whole number the value is not: 0.99996 is not '1'), from
    1 to a million in fixed notation with at least the whole part (999.6 was '1e+03', 12345.6
    '1.235e+04'), NaN as 'nan'; text as it is (a case named '001' or 'NaN' was shown as '1'
    or 'nan')."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == int(value) and abs(value) < 1e9:
            return str(int(value))
        if 1 <= abs(value) < 1e6:
            return f"{value:.{max(digits - len(str(int(abs(value)))), 0)}f}"
        text = f"{value:.{digits}g}"
        while digits < 12 and float(text) == int(float(text)) and "e" not in text:
            digits += 2
            text = f"{value:.{digits}g}"
        return text
    try:
        return fmt(float(value), digits)
    except (TypeError, ValueError):
        return str(value)


def cell(value: Any, tag: str = "td", cls: str = "", raw: str | None = None) -> str:
    """One cell; ``data-v`` holds the value the sort uses, the text its formatted form (or ``raw`` HTML)."""
    text = raw if raw is not None else esc(fmt(value))
    sort_value = "" if value is None else (fmt(value, 12) if not isinstance(value, str) else value)
    klass = cls or ("nan" if isinstance(value, float) and math.isnan(value) else "")
    attrs = f' data-v="{esc(sort_value)}"' + (f' class="{klass}"' if klass else "")
    return f"<{tag}{attrs}>{text}</{tag}>"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    table_id: str = "",
    sortable: bool = False,
    keys: Sequence[str] | None = None,
    row_classes: Sequence[str] | None = None,
    scroll: bool = False,
) -> str:
    """A table from header texts and rows of ready cells (:func:`cell`); ``keys`` name columns for ``#sort=``.

    The table scrolls sideways inside its own box (on a phone the page kept its width and
    the whole page scrolled); ``scroll=True``: also up and down, 640 px high at most,
    under a header that stays (the long per-case tables). Printed, both show every row.
    """
    keys = list(keys) if keys is not None else list(headers)
    head = "".join(f'<th data-key="{esc(k)}">{esc(h)}</th>' for h, k in zip(headers, keys))
    body = []
    for i, row in enumerate(rows):
        klass = row_classes[i] if row_classes else ""
        opening = f'<tr class="{esc(klass)}">' if klass else "<tr>"
        body.append(opening + "".join(row) + "</tr>")
    attrs = (f' id="{esc(table_id)}"' if table_id else "") + (' class="sortable"' if sortable else "")
    box = "scroll" if scroll else "wide"
    return (f'<div class="{box}"><table{attrs}><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body)
            + "\n</tbody></table></div>")


def img(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, body: str) -> str:
    """A complete HTML document: ``body`` with the inline style and the table-sorting script."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n<script>{_SORT_JS}</script>\n</body></html>\n"
    )
