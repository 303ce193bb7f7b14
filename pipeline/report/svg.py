"""Plain SVG charts for the run pages, and only for them. A report draws a page per run, up to a
thousand of them by default: a reused matplotlib figure cost about 0.65 s of a core a page, these
charts about 0.02 s. The scope is frozen to what runpage.py draws: panels with linear axes (a log
axis holds log10 values and labels its ticks with the values themselves, `log_y`), polylines (a NaN
is a gap), heatmaps (the cells as a PNG image, drawn pixelated so they stay crisp at any zoom), colour
bars, a second y axis on the right. Anything more is a summary figure, drawn with matplotlib. Text
is SVG text: sharp, selectable, searchable. matplotlib supplies the colormaps and the tick values.

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


def text(x: float, y: float, words: str, size: int = FONT, anchor: str = "middle", colour: str = "#222",
         rotate: bool = False, weight: str = "normal") -> str:
    """A text element, escaped, its baseline at y; `rotate`: upright (-90 degrees, an axis label)."""
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{colour}" '
            f'font-weight="{weight}"{turn}>{escape(words)}</text>')


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
                 ylim: tuple[float, float]) -> None:
        self.x, self.y, self.w, self.h = x, y, w, h
        self.xlim, self.ylim = xlim, ylim
        self.data: list[str] = []  # what is drawn in the rectangle (lines, images)
        self.parts: list[str] = []  # what frames it (box, ticks, labels)

    def px(self, values) -> np.ndarray:
        lo, hi = self.xlim
        return self.x + (np.asarray(values, dtype=float) - lo) / (hi - lo) * self.w

    def py(self, values) -> np.ndarray:
        lo, hi = self.ylim
        return self.y + self.h - (np.asarray(values, dtype=float) - lo) / (hi - lo) * self.h

    def line(self, xs, ys, colour: str, width: float = 1.6) -> None:
        """A polyline through the finite points: a NaN breaks it (a gap, never a zero). A lone finite
        point gets a dot: a one-point line is not seen."""
        px, py = self.px(xs), self.py(ys)
        finite = np.isfinite(px) & np.isfinite(py)
        runs = np.split(np.arange(len(px)), np.flatnonzero(np.diff(finite.astype(int)) != 0) + 1)
        for run in runs:
            if not len(run) or not finite[run[0]]:
                continue
            if len(run) == 1:
                self.data.append(f'<circle cx="{px[run[0]]:.1f}" cy="{py[run[0]]:.1f}" r="{width / 2 + 1.4:.1f}" '
                                 f'fill="{colour}"/>')
                continue
            points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px[run], py[run]))
            self.data.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                             f'stroke-width="{width}" stroke-linejoin="round"/>')

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
              ylabel_colour: str = "#222", xaxis: bool = True) -> None:
        """The box, the ticks and their labels, the title above, the axis labels. `log_y`: the values
        are log10 of what the labels say. `side`: where the y ticks go (a second y axis on the same
        rectangle takes the right, with xaxis=False: no box, no x ticks)."""
        x, y, w, h = self.x, self.y, self.w, self.h
        out = self.parts
        if xaxis:
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="none" stroke="#444" '
                       'stroke-width="0.8"/>')
            xs = ticks(*self.xlim, integer=integer_x)
            for value, at in zip(xs, self.px(xs)):
                out.append(f'<line x1="{at:.1f}" y1="{y + h:.1f}" x2="{at:.1f}" y2="{y + h + 4:.1f}" stroke="#444"/>')
                out.append(text(at, y + h + 16, label(value)))
            if xlabel:
                out.append(text(x + w / 2, y + h + 33, xlabel, size=FONT + 1))
            if title:
                out.append(text(x + w / 2, y - 8, title, size=FONT + 2, weight="bold"))
        edge, step = (x, -1) if side == "left" else (x + w, 1)
        ys = log_ticks(*self.ylim) if log_y else ticks(*self.ylim, integer=integer_y)
        names = [power_label(value) if log_y else label(value) for value in ys]
        for name, at in zip(names, self.py(ys)):
            out.append(f'<line x1="{edge:.1f}" y1="{at:.1f}" x2="{edge + 4 * step:.1f}" y2="{at:.1f}" stroke="#444"/>')
            out.append(text(edge + 7 * step, at + 4, name, anchor="end" if side == "left" else "start"))
        if ylabel:  # beyond the widest tick label; rotated text grows towards -x from its baseline
            reach = 7 + text_width(max(names, key=len, default="")) + 6
            at = edge - reach if side == "left" else edge + reach + FONT + 1
            out.append(text(at, y + h / 2, ylabel, size=FONT + 1, colour=ylabel_colour, rotate=True))

    def svg(self) -> str:
        """What is drawn, then its frame."""
        return "\n".join([*self.data, *self.parts])


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
