"""Server-drawn SVG plots for the lab: a line chart and a bar chart, nothing more (no JavaScript, no matplotlib:
a page answers in milliseconds and the plot is part of the HTML fragment the server returns).

Coordinates: data (x, y) -> pixels with a linear map over the data's range, padded; y grows upwards.
"""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
W, H, L, R, T, B = 520, 240, 56, 12, 14, 34        # size and margins (left, right, top, bottom) in pixels


def fmt(v: float) -> str:
    """A short axis label: 3 significant digits, no trailing zeros."""
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n 'nice' tick values (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _frame(x0, x1, y0, y1, xlabel, ylabel, title, xticks: bool = True) -> tuple[list[str], callable, callable]:
    sx = lambda x: L + (x - x0) / ((x1 - x0) or 1) * (W - L - R)            # noqa: E731
    sy = lambda y: H - B - (y - y0) / ((y1 - y0) or 1) * (H - T - B)        # noqa: E731
    out = [f'<svg class="plot" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
           f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
           f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fff" stroke="#999"/>']
    for t in _ticks(x0, x1) if xticks else []:
        out.append(f'<text x="{sx(t):.1f}" y="{H - B + 14}" font-size="10" text-anchor="middle">{fmt(t)}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{L - 4}" y="{sy(t) + 3:.1f}" font-size="10" text-anchor="end">{fmt(t)}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 4}" font-size="11" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{(T + H - B) / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {(T + H - B) / 2})">{escape(ylabel)}</text>')
    return out, sx, sy


def line_chart(series: dict[str, list[tuple[float, float]]], xlabel: str = "", ylabel: str = "", title: str = "",
               marks: list[tuple[float, str]] = (), ylim: tuple[float, float] | None = None) -> str:
    """One polyline per named series; `marks` are vertical lines (x, label)."""
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        return f'<p class="empty">{escape(title)}: no data yet</p>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    y0, y1 = ylim or (min(ys), max(ys))
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    out, sx, sy = _frame(min(xs), max(xs), y0, y1, xlabel, ylabel, title)
    for i, (name, s) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{sx(x):.1f},{sy(min(max(y, y0), y1)):.1f}" for x, y in s if math.isfinite(y))
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{pts}"/>')
        out.append(f'<text x="{L + 6}" y="{T + 12 + 12 * i}" font-size="10" fill="{c}">{escape(name)}</text>')
    for x, label in marks:
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{T}" y2="{H - B}" stroke="#555" '
                   f'stroke-dasharray="3,3"/><text x="{sx(x) + 3:.1f}" y="{H - B - 4}" font-size="10">'
                   f'{escape(label)}</text>')
    return "\n".join(out + ["</svg>"])


def bar_chart(labels: list[str], groups: dict[str, list[float]], ylabel: str = "", title: str = "") -> str:
    """Grouped bars: one group per label, one bar per named series."""
    vals = [v for g in groups.values() for v in g]
    lo, hi = min(0.0, *vals), max(0.0, *vals)
    if hi - lo < 1e-12:
        hi = lo + 1
    out, _, sy = _frame(0, 1, lo, hi, "", ylabel, title, xticks=False)   # bars are labelled below, not ticked
    n, k = len(labels), len(groups)
    slot = (W - L - R) / max(n, 1)
    bw = slot * 0.8 / max(k, 1)
    for j, (name, g) in enumerate(groups.items()):
        c = PALETTE[j % len(PALETTE)]
        for i, v in enumerate(g):
            x = L + i * slot + slot * 0.1 + j * bw
            top, bot = sy(max(v, 0)), sy(min(v, 0))
            out.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{bw:.1f}" height="{max(bot - top, 0.5):.1f}" '
                       f'fill="{c}"><title>{escape(name)} {escape(labels[i])}: {fmt(v)}</title></rect>')
        if k > 1:
            out.append(f'<text x="{W - R - 4}" y="{T + 12 + 12 * j}" font-size="10" fill="{c}" '
                       f'text-anchor="end">{escape(name)}</text>')
    for i, lab in enumerate(labels):
        out.append(f'<text x="{L + (i + 0.5) * slot:.1f}" y="{H - B + 14}" font-size="10" '
                   f'text-anchor="middle">{escape(lab)}</text>')
    return "\n".join(out + ["</svg>"])


def table(headers: list[str], rows: list[list], cls: str = "tbl") -> str:
    """An HTML table; floats shown with 4 significant digits."""
    def cell(v):
        return escape(f"{v:.4g}" if isinstance(v, float) else str(v))
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def kpis(items: list[tuple[str, str]]) -> str:
    """The headline numbers of a widget; each value carries data-kpi=<name> so tests can find it."""
    cells = "".join(f'<div class="kpi"><span class="k">{escape(k)}</span> <b data-kpi="{escape(k)}">{escape(v)}</b>'
                    f'</div>' for k, v in items)
    return f'<div class="kpis">{cells}</div>'
