"""``qcompile diff --html``: one self-contained page (inline CSS and SVG, no script, no network).

Sections: totals; the quantized layers; the per-layer error table with a bar chart of each
layer's SQNR; histograms of the activations entering the worst layers (the values that were
quantized, from model A on the data); and the chosen layer's nodes before and after.
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import numpy as np
import onnx

from qcompiler import inspect_model as im
from qcompiler.diff import LayerError, ModelDiff

_STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.small{color:#666;font-size:12px}
svg text{font:11px system-ui,sans-serif}.cols{display:flex;gap:24px;flex-wrap:wrap}
"""


def write(path: str | Path, d: ModelDiff, rows: list[LayerError] | None, outputs: dict | None,
          show_layer: str | None = None, histograms: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Write the page atomically (a temporary file renamed over ``path``)."""
    page = render(d, rows, outputs, show_layer, histograms)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)


def render(d: ModelDiff, rows, outputs, show_layer=None, histograms=None) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>qcompile diff</title><style>{_STYLE}</style>"
             f"</head><body><h1>qcompile diff</h1><p>{e(d.a)} → {e(d.b)}</p>"]
    parts.append(_totals(d))
    if d.quantized:
        parts.append("<h2>Quantized layers</h2><table><tr><th>layer</th><th>op</th><th>now</th></tr>"
                     + "".join(f"<tr><td>{e(q.layer)}</td><td>{e(q.op_type)}</td><td>{e(q.scheme)}</td></tr>"
                               for q in d.quantized) + "</table>")
    if rows:
        parts.append(_error_section(rows, outputs or {}))
    if histograms:
        parts.append("<h2>Activations entering the worst layers</h2><div class='cols'>"
                     + "".join(_histogram(name, counts, edges) for name, (counts, edges) in histograms.items())
                     + "</div>")
    layer = _chosen_layer(d, rows, show_layer)
    if layer is not None:
        parts.append(_subgraphs(d, layer))
    parts.append("</body></html>")
    return "".join(parts)


def _totals(d: ModelDiff) -> str:
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    dtypes = sorted(set(d.bytes_a) | set(d.bytes_b))
    ops = sorted(op for op in set(d.ops_a) | set(d.ops_b) if d.ops_a.get(op, 0) != d.ops_b.get(op, 0))
    return ("<h2>Totals</h2><table><tr><th></th><th>A</th><th>B</th></tr>"
            f"<tr><td>file</td><td class=n>{mb(d.file_bytes[0])}</td><td class=n>{mb(d.file_bytes[1])}</td></tr>"
            f"<tr><td>nodes</td><td class=n>{sum(d.ops_a.values())}</td><td class=n>{sum(d.ops_b.values())}</td></tr>"
            + "".join(f"<tr><td>{html.escape(t)} weights</td><td class=n>{mb(d.bytes_a.get(t, 0))}</td>"
                      f"<td class=n>{mb(d.bytes_b.get(t, 0))}</td></tr>" for t in dtypes)
            + "".join(f"<tr><td>{html.escape(op)}</td><td class=n>{d.ops_a.get(op, 0)}</td>"
                      f"<td class=n>{d.ops_b.get(op, 0)}</td></tr>" for op in ops)
            + "</table>")


def _error_section(rows: list[LayerError], outputs: dict) -> str:
    e = html.escape
    out = "<h2>Error per layer (worst own error first)</h2>"
    out += "".join(f"<p>output <b>{e(n)}</b>: SQNR {o['sqnr_db']:.1f} dB, cosine {o['cosine']:.5f}</p>"
                   for n, o in outputs.items())
    out += _bar_chart(rows)
    out += ("<table><tr><th>layer</th><th>own SQNR dB</th><th>SQNR dB</th><th>cosine</th><th>max |err|</th></tr>"
            + "".join(f"<tr><td>{e(r.layer)}</td><td class=n>{_db(r.local_sqnr_db)}</td><td class=n>{_db(r.sqnr_db)}</td>"
                      f"<td class=n>{r.cosine:.5f}</td><td class=n>{r.max_abs:.4g}</td></tr>" for r in rows)
            + "</table><p class=small>own SQNR: the quantized layer against the float layer fed the same input "
              "(the error it adds); SQNR: against model A at the same point (accumulated).</p>")
    return out


def _db(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _bar_chart(rows: list[LayerError]) -> str:
    """Horizontal bars, one per layer: own SQNR (else accumulated), longer is better."""
    values = [(r.layer, r.local_sqnr_db if r.local_sqnr_db is not None else r.sqnr_db) for r in rows]
    values = [(n, v if math.isfinite(v) else 100.0) for n, v in values]
    top = max((v for _, v in values), default=1.0) or 1.0
    bar_h, label_w, chart_w = 14, 360, 480
    height = bar_h * len(values) + 30
    svg = [f"<svg id='sqnr-chart' width='{label_w + chart_w + 60}' height='{height}' role='img' "
           "aria-label='per-layer SQNR'>"]
    for i, (name, v) in enumerate(values):
        y = 20 + i * bar_h
        width = max(1.0, chart_w * max(v, 0.0) / top)
        colour = "#d9534f" if v < 20 else "#f0ad4e" if v < 30 else "#5cb85c"
        svg.append(f"<text x='{label_w - 6}' y='{y + 10}' text-anchor='end'>{html.escape(name[-55:])}</text>"
                   f"<rect class='bar' x='{label_w}' y='{y}' width='{width:.1f}' height='{bar_h - 3}' fill='{colour}'/>"
                   f"<text x='{label_w + width + 4:.1f}' y='{y + 10}'>{v:.1f}</text>")
    svg.append(f"<text x='{label_w}' y='12'>SQNR, dB (red &lt; 20, amber &lt; 30)</text></svg>")
    return "".join(svg)


def _histogram(name: str, counts: np.ndarray, edges: np.ndarray) -> str:
    w, h = 320, 140
    peak = max(float(np.log10(counts.max() + 1)), 1e-9)
    bw = w / len(counts)
    bars = "".join(
        f"<rect x='{i * bw:.1f}' y='{h - h * np.log10(c + 1) / peak:.1f}' width='{max(bw - 0.5, 0.5):.1f}' "
        f"height='{h * np.log10(c + 1) / peak:.1f}' fill='#337ab7'/>" for i, c in enumerate(counts))
    return (f"<figure><svg class='histogram' width='{w}' height='{h + 30}'>{bars}"
            f"<text x='0' y='{h + 14}'>{edges[0]:.3g}</text><text x='{w}' y='{h + 14}' text-anchor='end'>{edges[-1]:.3g}</text>"
            f"</svg><figcaption>{html.escape(name)} (log counts)</figcaption></figure>")


def _chosen_layer(d: ModelDiff, rows, show_layer: str | None) -> str | None:
    if show_layer:
        for q in d.quantized:
            if show_layer in (q.layer, q.node):
                return q.layer
        for change in d.layers:
            if change.layer == show_layer:
                return change.layer
        return None
    if rows:
        return rows[0].layer
    return d.layers[0].layer if d.layers else None


def _subgraphs(d: ModelDiff, layer: str) -> str:
    change = next((c for c in d.layers if c.layer == layer), None)
    if change is None:
        return ""
    a, b = im.load_graph_only(d.a), im.load_graph_only(d.b)
    before = [n for n in a.graph.node if n.name in set(change.removed_nodes)]
    after = [n for n in b.graph.node if (n.name or n.output[0]) in set(change.added_nodes)]
    return (f"<h2>Layer {html.escape(layer)}: before and after</h2><div class='cols'>"
            f"<figure>{_draw(before)}<figcaption>A</figcaption></figure>"
            f"<figure>{_draw(after)}<figcaption>B</figcaption></figure></div>")


def _draw(nodes: list[onnx.NodeProto]) -> str:
    """Nodes top to bottom in graph order, an arrow for each value one makes and another reads."""
    box_w, box_h, gap = 260, 34, 22
    made = {out: i for i, n in enumerate(nodes) for out in n.output}
    height = len(nodes) * (box_h + gap) + 10
    svg = [f"<svg class='subgraph' width='{box_w + 120}' height='{height}'>"
           "<defs><marker id='arrow' markerWidth='8' markerHeight='8' refX='6' refY='3' orient='auto'>"
           "<path d='M0,0 L6,3 L0,6 z' fill='#555'/></marker></defs>"]
    for i, n in enumerate(nodes):
        y = 5 + i * (box_h + gap)
        for inp in n.input:
            j = made.get(inp)
            if j is not None and j < i:
                y0 = 5 + j * (box_h + gap) + box_h
                x = 40 + box_w + 10 * (i - j) if i - j > 1 else 40 + box_w / 2
                path = (f"M{40 + box_w / 2},{y0} L{40 + box_w / 2},{y - 2}" if i - j == 1 else
                        f"M{40 + box_w},{y0 - box_h / 2} C{x},{y0} {x},{y} {40 + box_w},{y + box_h / 2}")
                svg.append(f"<path d='{path}' stroke='#555' fill='none' marker-end='url(#arrow)'/>")
        label = html.escape(f"{n.op_type}")
        name = html.escape((n.name or n.output[0])[-40:])
        svg.append(f"<rect x='40' y='{y}' width='{box_w}' height='{box_h}' rx='4' fill='#eef' stroke='#88a'/>"
                   f"<text x='{40 + box_w / 2}' y='{y + 14}' text-anchor='middle'><tspan font-weight='bold'>{label}"
                   f"</tspan></text><text x='{40 + box_w / 2}' y='{y + 28}' text-anchor='middle' fill='#666'>{name}</text>")
    svg.append("</svg>")
    return "".join(svg)


def activation_histograms(rows: list[LayerError], inputs: dict[str, np.ndarray], count: int = 3,
                          bins: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Histograms of the activation entering each of the ``count`` worst layers, from the
    values ``qcompiler.diff.numeric_diff`` sampled (keyed by the layer's label)."""
    found = {}
    for r in rows[:count]:
        x = inputs.get(r.node)
        if x is None:
            continue
        x = x[np.isfinite(x)]
        found[r.layer] = np.histogram(x if x.size else np.zeros(1, np.float32), bins=bins)
    return found
