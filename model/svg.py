"""Charts as SVG text, written by hand: the project draws its plots without a plotting library.

Two charts, shared by training (loss.svg) and evaluation (eval.svg, compare.svg, demo.svg):

    line_chart   a line and/or dots against a numeric x axis (the loss curve)
    bar_chart    grouped horizontal bars, one group per label, one bar per series; several
                 panels (each with its own axis: rates on 0..1, losses on 0..max) stack in one SVG

Axis ticks fall on round numbers (`nice_ticks`: steps of 1, 2, 2.5 or 5 times a power of ten,
so a loss axis reads 5.0 5.5 6.0, not 5.072 5.767), integer axes get integer ticks, and the label
column is as wide as the longest label, so "detectable_content:number_placeholders" is not cut.
"""
from __future__ import annotations

import math
from html import escape

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"]
CHAR_W = 6.8  # average width of a 12px sans-serif character, for sizing the label column


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About n ticks covering [lo, hi] at a round step (1, 2, 2.5, 5 x 10^k; integers if asked)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (1 if integer else max(abs(lo) * 0.1, 1e-6))
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    if integer:
        step = max(1, round(step))
    first = math.floor(lo / step) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(round(first + k * step, 10))
        k += 1
    if ticks[-1] < hi:
        ticks.append(round(first + k * step, 10))
    return ticks


def _fmt_tick(v: float, ticks: list[float]) -> str:
    """A tick label with as many decimals as the step needs (0.25 steps: 2, 5 steps: 0)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = 0
    while decimals < 8 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f"{v:.{decimals}f}"


def line_chart(line: list[tuple[float, float]], dots: list[tuple[float, float]], title: str,
               x_label: str, width: int = 640, height: int = 360) -> str:
    """A line (e.g. train loss) and dots (e.g. held-out loss) against an integer x axis."""
    pts = line + dots
    pad_l, pad_r, pad_t, pad_b = 56, 16, 28, 40
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{pad_l}" y="16">{escape(title)}</text>',
           f'<text x="{pad_l + w / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>']
    if pts:
        xt = nice_ticks(min(p[0] for p in pts), max(p[0] for p in pts), 6, integer=True)
        yt = nice_ticks(min(p[1] for p in pts), max(p[1] for p in pts), 5)
        X = lambda s: pad_l + (s - xt[0]) / (xt[-1] - xt[0]) * w  # noqa: E731
        Y = lambda v: pad_t + (yt[-1] - v) / (yt[-1] - yt[0]) * h  # noqa: E731
        out += [f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#ddd"/>'
                f'<text x="{pad_l - 4}" y="{Y(v) + 4:.1f}" text-anchor="end">{_fmt_tick(v, yt)}</text>' for v in yt]
        out += [f'<text x="{X(s):.1f}" y="{pad_t + h + 16}" text-anchor="middle">{s:.0f}</text>' for s in xt]
        if line:
            points = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in line)
            out.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        out += [f'<circle cx="{X(s):.1f}" cy="{Y(v):.1f}" r="3.5" fill="#d62728"/>' for s, v in dots]
    out.append("</svg>")
    return "\n".join(out) + "\n"


Panel = tuple[list[str], dict[str, list[float | None]], str, float]  # labels, series, title, axis max


def bar_chart(panels: list[Panel], width: int = 360) -> str:
    """Panels of grouped horizontal bars stacked in one SVG; each panel has its own 0..max axis."""
    panels = [p for p in panels if p[0]]
    if not panels:
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="360" height="40" font-family="sans-serif" '
                'font-size="12"><text x="10" y="24">no metric to chart</text></svg>\n')
    left = 12 + CHAR_W * max(len(label) for labels, *_ in panels for label in labels)
    bar_h, gap = 14, 10
    out, y = [], 0.0
    for labels, series, title, axis_max in panels:
        group_h = bar_h * len(series) + gap
        out.append(f'<text x="10" y="{y + 20}" font-size="14">{escape(title)}</text>')
        top = y + 35
        for i, label in enumerate(labels):
            y0 = top + i * group_h
            out.append(f'<text x="{left - 6:.1f}" y="{y0 + group_h / 2}" text-anchor="end">{escape(label)}</text>')
            for j, values in enumerate(series.values()):
                v = values[i]
                if v is None:
                    continue
                bw = max(0.0, min(1.0, v / axis_max)) * width
                out.append(f'<rect x="{left:.1f}" y="{y0 + j * bar_h}" width="{bw:.1f}" height="{bar_h - 2}" '
                           f'fill="{COLORS[j % len(COLORS)]}"/><text x="{left + bw + 4:.1f}" '
                           f'y="{y0 + j * bar_h + bar_h - 4}">{v:.3f}</text>')
        bottom = top + len(labels) * group_h
        out.append(f'<line x1="{left:.1f}" y1="{top - 5}" x2="{left:.1f}" y2="{bottom}" stroke="#333"/>')
        for j, name in enumerate(series):
            out.append(f'<rect x="{left:.1f}" y="{bottom + 5 + 20 * j}" width="12" height="12" '
                       f'fill="{COLORS[j % len(COLORS)]}"/><text x="{left + 18:.1f}" '
                       f'y="{bottom + 16 + 20 * j}">{escape(name)}</text>')
        y = bottom + 10 + 20 * len(series)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80:.0f}" height="{y + 10:.0f}" '
            'font-family="sans-serif" font-size="12">\n' + "\n".join(out) + "\n</svg>\n")
