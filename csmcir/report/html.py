"""A static HTML result report: queries, their top-k hits with captions, ground truth, failures.

``write_report`` writes ``index.html`` (opens from disk, no server), ``report.js`` (rendering,
pagination, filters), ``data.js`` (the queries as one JSON object), ``thumbs/`` (small JPEG
thumbnails of every image shown) and ``rankings.json`` (what the page shows, for tools).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text, ensure_writable_dir

__all__ = ["highlight", "write_report", "thumbnail_bytes"]

# words shared with any query carry no signal, so they are never highlighted
STOPWORDS = frozenset(
    "a an the and or of to in on at by for with from into is are be it its this that make makes made "
    "same but as instead change changed turn turned so now than then there their them they".split()
)
_WORD = re.compile(r"[A-Za-z0-9]+")


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in STOPWORDS and len(w) > 1}


def highlight(text: str, words: set[str]) -> str:
    """HTML-escaped ``text`` with every word in ``words`` (lower case) wrapped in ``<mark>``."""
    out, last = [], 0
    for m in _WORD.finditer(text):
        if m.group(0).lower() in words:
            out += [html.escape(text[last : m.start()]), "<mark>", html.escape(m.group(0)), "</mark>"]
            last = m.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def thumbnail_bytes(img, size: int = 96, fmt: str = "JPEG") -> bytes:
    """``img`` (PIL) shrunk to fit ``size`` x ``size``, encoded (JPEG quality 85, or PNG)."""
    import io

    im = img.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _thumb_name(image_id: str) -> str:
    """A safe, unique file name for an image id (ids may hold '/' or odd characters)."""
    import hashlib

    stem = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)[:60]
    return f"{stem}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}.jpg"


def write_report(
    out: str | Path,
    queries: list[dict],
    load_image: Callable[[str], object],
    captions: dict,
    title: str,
    metrics: dict[str, float],
    group_metrics: dict[str, dict[str, float]],
    thumb_size: int = 96,
    progress: bool = True,
) -> Path:
    """Write the report into ``out``.

    ``queries``: ``{"id", "reference", "text", "group", "targets": [...], "hits": [[id, score], ...]}``
    in display order, optionally ``"reasoning"`` (a teacher's text) and ``"prompts"`` (the intent
    pool's soft prompts the query chose); ``captions``: ``{image_id: Caption}`` (levels and final) for the hits.
    """
    from tqdm import tqdm

    out = ensure_writable_dir(out)
    thumbs = ensure_writable_dir(out / "thumbs")
    shown: dict[str, str] = {}
    for q in queries:
        for i in [q["reference"], *(h[0] for h in q["hits"])]:
            shown.setdefault(i, _thumb_name(i))
    for image_id, name in tqdm(shown.items(), desc="thumbnails", unit="img", disable=not progress):
        path = thumbs / name
        if not path.is_file():  # a rerun reuses them
            data = thumbnail_bytes(load_image(image_id), thumb_size)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)

    records = []
    for q in queries:
        words = content_words(q["text"])
        targets = set(q["targets"])
        hits = []
        for rank, (image_id, score) in enumerate(q["hits"], start=1):
            cap = captions.get(image_id)
            levels = [] if cap is None else [[k, highlight(v, words)] for k, v in cap.levels.items()]
            hits.append(
                {
                    "id": image_id,
                    "rank": rank,
                    "score": round(float(score), 4),
                    "thumb": "thumbs/" + shown[image_id],
                    "gt": image_id in targets,
                    "final": "" if cap is None else highlight(cap.final, words),
                    "levels": levels,
                }
            )
        first = next((h["rank"] for h in hits if h["gt"]), None)
        records.append(
            {
                "id": q["id"],
                "text": html.escape(q["text"]),
                "group": q.get("group") or "all",
                "reasoning": html.escape(q.get("reasoning") or ""),
                "prompts": [int(i) for i in q.get("prompts") or []],
                "reference": {"id": q["reference"], "thumb": "thumbs/" + shown[q["reference"]]},
                "targets": list(q["targets"]),
                "first_hit": first,
                "hits": hits,
            }
        )
    data = {"title": title, "metrics": metrics, "groups": group_metrics, "queries": records}
    # a <script> (not fetch) so the page works from file://; "</" cannot end the script early
    atomic_write_text(out / "data.js", "window.REPORT = " + json.dumps(data).replace("</", "<\\/") + ";\n")
    atomic_write_text(out / "report.js", _JS)
    atomic_write_text(out / "index.html", _HTML.replace("__TITLE__", html.escape(title)))
    atomic_write_json(out / "rankings.json", {q["id"]: [h[0] for h in q["hits"]] for q in queries}, indent=None)
    return out / "index.html"


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<link rel="icon" href="data:,">
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.m{border-collapse:collapse;margin:.5em 0}table.m td,table.m th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
.q{border-top:1px solid #ddd;padding:.8em 0}.row{display:flex;gap:.6em;flex-wrap:wrap;align-items:flex-start}
.card{width:150px;font-size:12px}.card img{display:block;width:96px;height:96px;object-fit:contain;background:#f4f4f4;border:3px solid transparent}
.card.gt img{border-color:#1a9e3f}.card .gtm{color:#1a9e3f;font-weight:bold}.ref img{border-color:#3465a4}
mark{background:#ffe27a}.fail{color:#b00}.ok{color:#1a9e3f}details{margin-top:.2em}
nav{margin:.8em 0}nav button{margin-right:.3em}
</style></head>
<body>
<h1 id="title">__TITLE__</h1>
<div id="summary"></div>
<div><label><input type="checkbox" id="failures"> failures only (no ground truth at rank 1)</label>
 <span id="groupfilter"></span></div>
<nav id="pager-top"></nav><div id="queries"></div><nav id="pager-bottom"></nav>
<script src="data.js"></script><script src="report.js"></script>
</body></html>
"""

_JS = r"""(function () {
  "use strict";
  var R = window.REPORT, PAGE = 20, page = 0, group = null;
  var failuresOnly = document.getElementById("failures");
  function el(tag, attrs, html) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (html !== undefined) e.innerHTML = html;
    return e;
  }
  function selected() {
    return R.queries.filter(function (q) {
      return (!failuresOnly.checked || q.first_hit !== 1) && (group === null || q.group === group);
    });
  }
  function summary() {
    var s = document.getElementById("summary");
    var keys = Object.keys(R.metrics);
    var t = "<table class='m'><tr><th></th>" + keys.map(function (k) { return "<th>" + k + "</th>"; }).join("") + "<th>queries</th></tr>";
    t += "<tr><th>all</th>" + keys.map(function (k) { return "<td>" + R.metrics[k].toFixed(1) + "</td>"; }).join("") + "<td>" + R.queries.length + "</td></tr>";
    Object.keys(R.groups).sort().forEach(function (g) {
      var m = R.groups[g];
      t += "<tr><th><a href='#' data-group='" + g + "'>" + g + "</a> <a href='#' data-group='" + g + "' data-fail='1'>(failures)</a></th>" +
        keys.map(function (k) { return "<td>" + (m[k] === undefined ? "" : m[k].toFixed(1)) + "</td>"; }).join("") + "<td>" + m.queries + "</td></tr>";
    });
    s.innerHTML = t + "</table>";
    s.querySelectorAll("a[data-group]").forEach(function (a) {
      a.addEventListener("click", function (ev) {
        ev.preventDefault(); group = a.getAttribute("data-group"); failuresOnly.checked = a.hasAttribute("data-fail"); page = 0; render();
      });
    });
  }
  function card(h) {
    var c = el("div", {"class": "card hit" + (h.gt ? " gt" : ""), "data-rank": h.rank, "data-id": h.id});
    c.appendChild(el("img", {src: h.thumb, alt: h.id, width: 96, height: 96}));
    c.appendChild(el("div", {}, "#" + h.rank + " " + h.score.toFixed(3) + (h.gt ? " <span class='gtm'>ground truth</span>" : "")));
    c.appendChild(el("div", {"class": "final"}, h.final));
    if (h.levels.length) {
      var d = el("details", {}, "<summary>caption levels</summary>" + h.levels.map(function (l) { return "<div><b>" + l[0] + ":</b> " + l[1] + "</div>"; }).join(""));
      c.appendChild(d);
    }
    return c;
  }
  function pager(id, n) {
    var nav = document.getElementById(id); nav.innerHTML = "";
    var pages = Math.max(1, Math.ceil(n / PAGE));
    var prev = el("button", {}, "&larr; previous"), next = el("button", {}, "next &rarr;");
    prev.disabled = page === 0; next.disabled = page >= pages - 1;
    prev.onclick = function () { page--; render(); }; next.onclick = function () { page++; render(); };
    nav.appendChild(prev); nav.appendChild(next);
    nav.appendChild(el("span", {}, " page " + (page + 1) + " of " + pages + " (" + n + " queries" + (group ? ", " + group : "") + ")"));
  }
  function render() {
    var qs = selected(), box = document.getElementById("queries");
    document.getElementById("groupfilter").innerHTML = group ? " group <b>" + group + "</b> <a href='#' id='allgroups'>(all groups)</a>" : "";
    var ag = document.getElementById("allgroups");
    if (ag) ag.onclick = function (ev) { ev.preventDefault(); group = null; page = 0; render(); };
    pager("pager-top", qs.length); pager("pager-bottom", qs.length);
    box.innerHTML = "";
    qs.slice(page * PAGE, (page + 1) * PAGE).forEach(function (q) {
      var d = el("div", {"class": "q", "data-query": q.id});
      var status = q.first_hit === 1 ? "<span class='ok'>hit at rank 1</span>" :
        (q.first_hit ? "<span class='fail'>ground truth at rank " + q.first_hit + "</span>" : "<span class='fail'>ground truth not in the top " + q.hits.length + "</span>");
      d.appendChild(el("div", {}, "<b>" + q.id + "</b> [" + q.group + "] &ldquo;" + q.text + "&rdquo; &mdash; " + status));
      var row = el("div", {"class": "row"});
      var ref = el("div", {"class": "card ref"});
      ref.appendChild(el("img", {src: q.reference.thumb, alt: q.reference.id, width: 96, height: 96}));
      ref.appendChild(el("div", {}, "reference " + q.reference.id));
      row.appendChild(ref);
      q.hits.forEach(function (h) { row.appendChild(card(h)); });
      d.appendChild(row);
      if (q.prompts.length) d.appendChild(el("div", {"class": "prompts"}, "soft prompts chosen: " + q.prompts.join(", ")));
      if (q.reasoning) d.appendChild(el("details", {"class": "reasoning"}, "<summary>teacher reasoning</summary><div>" + q.reasoning + "</div>"));
      box.appendChild(d);
    });
  }
  failuresOnly.addEventListener("change", function () { page = 0; render(); });
  summary(); render();
})();
"""
