"""A grid of line panels in SVG: rows of statistics, columns of activations, one line per colour
key with its band, predictions in black dotted with crosses, one legend on the right. The summary's
gradient-flow, signal, gradient-signal and training figures are drawn with it (svg.py): matplotlib
spent seconds laying out their fifteen axes, this takes a few milliseconds.

    rows = [Row("log10 norm", [Cell("||dL/dh|| - relu", mean_series(frame, "layer", "v", "setup", keys))])]
    drawing = facets("gradient-flow", rows, "layer", palette, "init", "what it shows")
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from markupsafe import Markup

from . import svg

PANEL_W, PANEL_H = 210, 160  # px
LEFT, TOP = 78, 34  # room for the y axis label and ticks; for the first row's titles
GAP_X, GAP_Y, GAP_Y_LABELLED = 22, 46, 60  # between panels; between rows (with x tick labels under each row)


@dataclass
class Line:
    key: str  # its colour in the palette, its legend entry
    x: np.ndarray
    y: np.ndarray
    sd: np.ndarray | None = None  # a band of one standard deviation around y, where given
    style: str = "solid"  # svg.DASHES


@dataclass
class Cell:
    title: str
    lines: list[Line]
    predictions: list[Line] = field(default_factory=list)  # black dotted, crosses in the key's colour
    stops: tuple[np.ndarray, np.ndarray] | None = None  # red X marks at (x, y), on the panel's edge beyond it


@dataclass
class Row:
    ylabel: str
    cells: list[Cell]
    log: bool = False  # the y values are log10 of what the ticks say
    ylim: tuple[float, float] | None = None  # the default: every value of the row, bands and predictions included


def mean_series(frame: pd.DataFrame, x: str, y: str, hue: str, keys, band: bool = True,
               dashed: set | None = None) -> list[Line]:
    """One line per hue key present: the mean of y over the rows at each x, with one standard
    deviation where several rows share an x and `band`. Aggregated by pandas in one pass."""
    stats = frame.groupby([hue, x], sort=True)[y].agg(["mean", "std", "count"]).reset_index()
    lines = []
    for key in keys:
        rows = stats[stats[hue] == key]
        if rows.empty:
            continue
        sd = rows["std"].to_numpy(dtype=float) if band and (rows["count"] > 1).any() else None
        lines.append(Line(key, rows[x].to_numpy(dtype=float), rows["mean"].to_numpy(dtype=float), sd,
                          "dashed" if key in (dashed or ()) else "solid"))
    return lines


def reach(lines: list[Line]) -> np.ndarray:
    """Every y the lines reach, their bands included (for a panel's y range)."""
    found = [np.array([np.nan])]
    for line in lines:
        found.append(line.y)
        if line.sd is not None:
            found += [line.y - line.sd, line.y + line.sd]
    return np.concatenate(found).astype(float)


def draw_lines(panel: svg.Panel, lines: list[Line], palette: dict, dots: bool = True) -> None:
    """The bands first, then the lines over them, each named by its key (hovering shows it)."""
    for line in lines:
        if line.sd is not None:
            panel.band(line.x, line.y - line.sd, line.y + line.sd, palette[line.key])
    for line in lines:
        panel.line(line.x, line.y, palette[line.key], width=1.8, dots=dots, style=line.style, name=line.key)


def facets(key: str, rows: list[Row], xlabel: str, palette: dict, legend_title: str, description: str,
           dots: bool = True, integer_x: bool = True, prediction: str = "", extra: list | None = None) -> Markup:
    """The figure: rows x columns of panels sharing x (every panel) and y (every row), a legend
    with an entry per palette key (and `prediction`'s, where given, and `extra` legend entries)."""
    xs = np.concatenate([np.asarray(line.x, dtype=float) for row in rows for cell in row.cells
                         for line in cell.lines + cell.predictions] or [np.array([0.0, 1.0])])
    xlim = svg.limits(xs, pad=0.04)
    columns = max(len(row.cells) for row in rows)
    parts = []
    top = TOP
    for r, row in enumerate(rows):
        ylim = row.ylim or svg.limits(reach([line for cell in row.cells for line in cell.lines + cell.predictions]),
                                      pad=0.06)
        last = r == len(rows) - 1
        for c, cell in enumerate(row.cells):
            x = LEFT + c * (PANEL_W + GAP_X)
            panel = svg.Panel(x, top, PANEL_W, PANEL_H, xlim, ylim, clip=f"{key}-{r}-{c}")
            draw_lines(panel, cell.lines, palette, dots)
            for line in cell.predictions:
                panel.line(line.x, line.y, "black", width=1.6, style="dotted", name=f"{line.key}: {prediction}")
                panel.crosses(line.x, line.y, palette[line.key])
            if cell.stops is not None and len(cell.stops[0]):
                panel.crosses(cell.stops[0], np.clip(cell.stops[1], *ylim), "#d1495b", size=5, width=2.4, edge=True)
            panel.frame(cell.title, xlabel if last else "", row.ylabel if c == 0 else "", integer_x=integer_x,
                        log_y=row.log, x_labels=last, y_labels=c == 0)
            parts.append(panel.svg())
        top += PANEL_H + (GAP_Y_LABELLED if last else GAP_Y)
    styles = {line.key: line.style for row in rows for cell in row.cells for line in cell.lines}
    entries = [(str(k), colour, styles.get(k, "solid"), "dot" if dots else "") for k, colour in palette.items()]
    entries += extra or []
    if prediction:
        entries.append((prediction, "black", "dotted", "cross"))
    right = LEFT + columns * (PANEL_W + GAP_X) + 12
    drawn, height = svg.legend(right, TOP, legend_title, entries)
    parts.append(drawn)
    width = right + max(svg.text_width(text) for text, *_ in [(legend_title,), *entries]) + 40
    return Markup(svg.document(int(width), int(max(top - 10, TOP + height + 10)), parts, description))

