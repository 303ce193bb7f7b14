"""Plain SVG charts for the run pages and the summary's line and heatmap figures. A report draws a
page per run, up to a thousand of them by default: matplotlib spent about 0.8 s of a core laying out
and rasterizing one page's eight axes, these charts take about 0.05 s (and a summary figure of
fifteen panels 4 s against about 0.1 s). Only what the report needs: panels with linear axes (a log
axis holds log10 values and labels its ticks with the values themselves, `log_y`), lines (solid,
dashed, dotted; dots or crosses at the points), bands, heatmaps (the cells as a PNG image, drawn
pixelated so they stay crisp at any zoom), colour bars, legends. Text is SVG text: sharp,
selectable, searchable. matplotlib supplies the colormaps and the tick values only.

    panel = Panel(60, 30, 280, 200, xlim=(0, 14), ylim=(-3, 1))
    panel.line(x, y, "#3b75af")
    panel.frame(title="...", xlabel="layer", ylabel="log10 norm")
    drawing = document(1100, 600, [panel.svg()], "what it shows, for screen readers")
"""

from __future__ import annotations

import base64
import io
import math
from html import escape

import matplotlib
import matplotlib.image
import numpy as np
from matplotlib.ticker import MaxNLocator

FONT = 11  # px, tick labels; titles and axis labels are a little larger
DASHES = {"solid": "", "dashed": "6 3", "dotted": "1.5 2.5"}
CHECKS: list = []  # functions called with (panel, log_y) as a panel is framed (the tests add a legibility check)


def ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> np.ndarray:
    """About n round values between lo and hi (matplotlib's MaxNLocator), those inside the range."""
    values = MaxNLocator(n, integer=integer).tick_values(lo, hi)
    slack = 1e-9 * (hi - lo)
    return values[(values >= lo - slack) & (values <= hi + slack)] + 0.0  # + 0.0: no "-0"


def limits(values, pad: float = 0.04) -> tuple[float, float]:
    """The finite range of values, padded by `pad` of its span (one value gets a range around it)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12 * max(1.0, abs(hi)):  # one value: a range around it that floats can tell apart
        half = max(0.5, 0.05 * abs(hi))
        return lo - half, hi + half
    span = hi - lo
    return lo - pad * span, hi + pad * span


def label(value: float) -> str:
    return f"{value:g}"


def log_ticks(lo: float, hi: float) -> np.ndarray:
    """Ticks for an axis of log10 values: the powers of ten in range (at most about five of them), or
    1, 2 and 5 times them where fewer than three powers fall in range."""
    decades = np.arange(math.floor(lo), math.ceil(hi) + 1)
    powers = decades[(decades >= lo) & (decades <= hi)]
    if len(powers) >= 3:
        return powers[:: max(1, math.ceil(len(powers) / 5))] + 0.0
    steps = (decades[:, None] + np.log10([1, 2, 5])).ravel()
    return steps[(steps >= lo) & (steps <= hi)]


def power_label(value: float) -> str:
    """A tick label on a log10 axis: the value itself (10^value), to three significant digits."""
    return f"{float(f'{10.0 ** value:.3g}'):g}"


def text_width(text: str, size: int = FONT) -> float:
    """About how wide a line of text is drawn, in px (a sans-serif digit is ~0.6 em)."""
    return 0.62 * size * len(text)


def _text(x: float, y: float, text: str, size: int = FONT, anchor: str = "middle", colour: str = "#222",
          rotate: bool = False, weight: str = "normal", angle: float = 0) -> str:
    """`rotate`: upright (-90 degrees, an axis label); `angle`: any other turn about (x, y)."""
    angle = -90 if rotate else angle
    turn = f' transform="rotate({angle:g} {x:.1f} {y:.1f})"' if angle else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}" '
            f'font-weight="{weight}"{turn}>{escape(text)}</text>')


def png(rgba: np.ndarray) -> str:
    """An (rows, columns, 4) array of floats in [0, 1] as a base64 PNG data URI, row 0 at the top."""
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, (np.clip(rgba, 0, 1) * 255).round().astype(np.uint8), format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def colours(matrix: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """The colormap's RGBA for each cell (vmin..vmax spread over the map); NaN cells transparent."""
    span = vmax - vmin if vmax > vmin else 1.0
    rgba = matplotlib.colormaps[cmap](np.clip((matrix - vmin) / span, 0, 1))
    rgba[~np.isfinite(matrix)] = 0.0
    return rgba


class Panel:
    """One chart: data coordinates xlim x ylim mapped onto the rectangle (x, y, w, h) in pixels,
    y growing upwards. Draw into it (line, image), then frame it (axes, ticks, labels)."""

    def __init__(self, x: float, y: float, w: float, h: float, xlim: tuple[float, float],
                 ylim: tuple[float, float], clip: str = "") -> None:
        """`clip`: an id, unique in the page, under which what is drawn is cut to the rectangle (a line
        beyond ylim stops at the edge instead of running over the neighbours)."""
        self.x, self.y, self.w, self.h = x, y, w, h
        self.xlim, self.ylim = xlim, ylim
        self.clip = clip
        self.data: list[str] = []  # what is drawn in the rectangle (lines, bands, images)
        self.parts: list[str] = []  # what frames it (box, ticks, labels) and marks on its edges
        self.ys: list[np.ndarray] = []  # the finite y values drawn, for CHECKS

    def px(self, values) -> np.ndarray:
        lo, hi = self.xlim
        return self.x + (np.asarray(values, dtype=float) - lo) / (hi - lo) * self.w

    def py(self, values) -> np.ndarray:
        lo, hi = self.ylim
        return self.y + self.h - (np.asarray(values, dtype=float) - lo) / (hi - lo) * self.h

    def _runs(self, xs, ys) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Pixel coordinates, and the index runs of finite points between NaNs."""
        px, py = self.px(xs), self.py(ys)
        finite = np.isfinite(px) & np.isfinite(py)
        self.ys.append(np.asarray(ys, dtype=float)[finite])
        runs = np.split(np.arange(len(px)), np.flatnonzero(np.diff(finite.astype(int)) != 0) + 1)
        return px, py, [run for run in runs if len(run) and finite[run[0]]]

    def line(self, xs, ys, colour: str, width: float = 1.6, dots: bool = False, style: str = "solid",
             name: str = "") -> None:
        """A polyline through the finite points (a NaN breaks it), with dots at the points if asked
        (a lone finite point gets its dot either way: a one-point line is not seen). `name`: what a
        reader sees on hovering the line (its <title>)."""
        px, py, runs = self._runs(xs, ys)
        dash = f' stroke-dasharray="{DASHES[style]}"' if DASHES[style] else ""
        tip = f"<title>{escape(name)}</title>" if name else ""
        for run in runs:
            points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px[run], py[run]))
            self.data.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                             f'stroke-width="{width}" stroke-linejoin="round"{dash}>{tip}</polyline>')
        for run in runs:
            if dots or len(run) == 1:
                self.data += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{max(2.4, width / 2 + 0.6):.1f}" fill="{colour}"/>'
                              for a, b in zip(px[run], py[run])]

    def band(self, xs, lo, hi, colour: str, opacity: float = 0.2) -> None:
        """A filled band between lo and hi over xs (a NaN in either breaks it)."""
        lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        px, low, runs = self._runs(xs, np.where(np.isfinite(hi), lo, np.nan))
        high = self.py(hi)
        for run in runs:
            edge = [*zip(px[run], low[run]), *zip(px[run][::-1], high[run][::-1])]
            points = " ".join(f"{a:.1f},{b:.1f}" for a, b in edge)
            self.data.append(f'<polygon points="{points}" fill="{colour}" fill-opacity="{opacity}" stroke="none"/>')

    def points(self, xs, ys, colour: str, radius: float = 3.0, name: str = "") -> None:
        """A dot at each finite point (a scatter plot); `name` shows on hovering one."""
        px, py, runs = self._runs(xs, ys)
        tip = f"<title>{escape(name)}</title>" if name else ""
        self.data += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{radius}" fill="{colour}">{tip}</circle>'
                      for run in runs for a, b in zip(px[run], py[run])]

    def bar(self, x0: float, x1: float, y0: float, y1: float, colour: str, name: str = "") -> None:
        """A rectangle from (x0, y0) to (x1, y1) in data coordinates (a bar, or a stacked bar's part)."""
        left, right = sorted(self.px([x0, x1]))
        top, bottom = sorted(self.py([y0, y1]))
        self.ys.append(np.array([y0, y1], dtype=float))
        tip = f"<title>{escape(name)}</title>" if name else ""
        self.data.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" height="{bottom - top:.1f}" '
                         f'fill="{colour}">{tip}</rect>')

    def crosses(self, xs, ys, colour: str, size: float = 3.5, width: float = 1.4, edge: bool = False) -> None:
        """An x at each finite point. `edge`: drawn over the frame, unclipped (a mark on the panel's edge)."""
        px, py, runs = self._runs(xs, ys)
        path = " ".join(f"M{a - size:.1f},{b - size:.1f}L{a + size:.1f},{b + size:.1f}"
                        f"M{a - size:.1f},{b + size:.1f}L{a + size:.1f},{b - size:.1f}"
                        for run in runs for a, b in zip(px[run], py[run]))
        if path:
            (self.parts if edge else self.data).append(f'<path d="{path}" stroke="{colour}" stroke-width="{width}" '
                                                       'fill="none"/>')

    def image(self, matrix: np.ndarray, extent: tuple[float, float, float, float], cmap: str, vmin: float,
              vmax: float) -> None:
        """A heatmap: matrix[row, column] drawn over extent = (x0, x1, y0, y1), row 0 at y0 (the bottom)."""
        x0, x1, y0, y1 = extent
        left, right = self.px([x0, x1])
        top, bottom = self.py([y1, y0])
        self.data.append(f'<image x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" height="{bottom - top:.1f}" '
                          f'preserveAspectRatio="none" style="image-rendering:pixelated" '
                          f'href="{png(colours(matrix[::-1], cmap, vmin, vmax))}"/>')

    def frame(self, title: str = "", xlabel: str = "", ylabel: str = "", integer_x: bool = False,
              integer_y: bool = False, log_y: bool = False, side: str = "left",
              ylabel_colour: str = "#222", xaxis: bool = True, x_labels: bool = True, y_labels: bool = True,
              log_x: bool = False, xticks: list[tuple[float, str]] | None = None, slant: bool = False) -> None:
        """The box, the ticks and their labels, the title above, the axis labels. `log_y`, `log_x`: the
        values are log10 of what the labels say. `side`: where the y ticks go (a second y axis on the
        same rectangle takes the right). `x_labels`, `y_labels`: False leaves the ticks unlabelled
        (panels in a row or column that share the axis). `xticks`: (value, label) pairs instead of
        round values (categories); `slant`: their labels turned 40 degrees, for long names."""
        for check in CHECKS:
            check(self, log_y)
        x, y, w, h = self.x, self.y, self.w, self.h
        out = self.parts
        if xaxis:
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="none" stroke="#444" '
                       'stroke-width="0.8"/>')
            if xticks is None:
                xs = log_ticks(*self.xlim) if log_x else ticks(*self.xlim, integer=integer_x)
                xticks = [(value, power_label(value) if log_x else label(value)) for value in xs]
            drop = 33  # from the frame's bottom to the axis label's baseline
            for (_, name), at in zip(xticks, self.px([value for value, _ in xticks])):
                out.append(f'<line x1="{at:.1f}" y1="{y + h:.1f}" x2="{at:.1f}" y2="{y + h + 4:.1f}" stroke="#444"/>')
                if x_labels and slant:  # the label ends under its tick, coming up from the lower left (low
                    # enough that its box clears the y axis's lowest tick label)
                    out.append(_text(at + 3, y + h + 18, name, anchor="end", angle=-40))
                    drop = max(drop, 0.64 * text_width(name) + 36)
                elif x_labels:
                    out.append(_text(at, y + h + 16, name))
            if xlabel:
                out.append(_text(x + w / 2, y + h + drop, xlabel, size=FONT + 1))
            if title:
                out.append(_text(x + w / 2, y - 8, title, size=FONT + 2, weight="bold"))
        edge, step = (x, -1) if side == "left" else (x + w, 1)
        ys = log_ticks(*self.ylim) if log_y else ticks(*self.ylim, integer=integer_y)
        names = [power_label(value) if log_y else label(value) for value in ys]
        for name, at in zip(names, self.py(ys)):
            out.append(f'<line x1="{edge:.1f}" y1="{at:.1f}" x2="{edge + 4 * step:.1f}" y2="{at:.1f}" stroke="#444"/>')
            if y_labels:
                out.append(_text(edge + 7 * step, at + 4, name, anchor="end" if side == "left" else "start"))
        if ylabel:  # beyond the widest tick label; rotated text grows towards -x from its baseline
            reach = 7 + (text_width(max(names, key=len, default="")) if y_labels else 0) + 6
            at = edge - reach if side == "left" else edge + reach + FONT + 1
            out.append(_text(at, y + h / 2, ylabel, size=FONT + 1, colour=ylabel_colour, rotate=True))

    def legend(self, entries: list[tuple[str, str]], y_offset: float = 50) -> None:
        """(label, colour) pairs as coloured words in a row under the panel, centred."""
        widths = [text_width(text) + 26 for text, _ in entries]
        left = self.x + self.w / 2 - sum(widths) / 2
        for (text, colour), width in zip(entries, widths):
            yy = self.y + self.h + y_offset
            self.parts.append(f'<line x1="{left:.1f}" y1="{yy - 4:.1f}" x2="{left + 16:.1f}" y2="{yy - 4:.1f}" '
                              f'stroke="{colour}" stroke-width="2"/>')
            self.parts.append(_text(left + 20, yy, text, anchor="start", colour=colour))
            left += width

    def svg(self) -> str:
        """What is drawn (cut to the rectangle where the panel has a clip id), then its frame."""
        data = "\n".join(self.data)
        if self.clip and data:
            data = (f'<clipPath id="{self.clip}"><rect x="{self.x:.1f}" y="{self.y:.1f}" width="{self.w:.1f}" '
                    f'height="{self.h:.1f}"/></clipPath>\n<g clip-path="url(#{self.clip})">\n{data}\n</g>')
        return "\n".join([data, *self.parts]) if data else "\n".join(self.parts)


def legend(x: float, y: float, title: str, entries: list[tuple[str, str, str, str]]) -> tuple[str, float]:
    """A legend in a column at (x, y): a title, then (label, colour, style, marker) entries, each a
    short line in that colour and style (DASHES) with its marker ("", "dot" or "cross") on it.
    Returns the SVG and its height in px."""
    parts = [_text(x, y + FONT, title, anchor="start", weight="bold")] if title else []
    at = y + FONT + (8 if title else 0)
    for text, colour, style, marker in entries:
        at += 18
        key = Panel(x, at - 14, 24, 10, (0.0, 1.0), (0.0, 1.0))
        if style != "none":
            key.line([0.0, 1.0], [0.5, 0.5], colour, width=1.8, style=style)
        if marker == "dot":
            key.points([0.5], [0.5], colour, radius=2.6)
        elif marker == "cross":
            key.crosses([0.5], [0.5], "#222" if colour == "black" else colour,
                        **({} if style != "none" else {"size": 5, "width": 2.4}))
        parts += [key.svg(), _text(x + 30, at - 5, text, anchor="start")]
    return "\n".join(parts), at - y + 4


def colour_bar(x: float, y: float, h: float, cmap: str, vmin: float, vmax: float, title: str) -> str:
    """A vertical colour bar 12 px wide at (x, y), vmin at the bottom, ticks and title on its right."""
    bar = Panel(x, y, 12, h, (0.0, 1.0), (vmin, vmax) if vmax > vmin else (vmin - 0.5, vmin + 0.5))
    bar.image(np.linspace(bar.ylim[0], bar.ylim[1], 128)[:, None], (0, 1, *bar.ylim), cmap, *bar.ylim)
    bar.parts.append(f'<rect x="{x}" y="{y}" width="12" height="{h}" fill="none" stroke="#444" stroke-width="0.8"/>')
    bar.frame(side="right", xaxis=False, ylabel=title)
    return bar.svg()


def document(width: int, height: int, parts: list[str], title: str) -> str:
    """The SVG element, scaled to its container's width (viewBox), with an accessible label."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'role="img" aria-label="{escape(title)}" font-family="system-ui, sans-serif">\n'
            + "\n".join(parts) + "\n</svg>")
