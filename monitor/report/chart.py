"""The geometry of the report's two charts, from the document's ``chart`` figures.

Pure arithmetic: no drawing library, no I/O.  :func:`daily` lays out the bars of
each day's energy against the cap pro-rated to that day (and a daily cap, if
one applies); :func:`cumulative` the running total against the monthly cap and
its pro-rated path.  The template ``chart.svg.j2`` draws what these return, so
the SVG is inline, needs no external asset, and is escaped like the rest of
the page.  Coordinates are SVG user units, rounded to 0.1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WIDTH, HEIGHT = 720.0, 260.0
LEFT, RIGHT, TOP, BOTTOM = 64.0, 16.0, 26.0, 36.0
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM


def _r(x: float) -> float:
    return round(x, 1) + 0.0


def nice_step(span: float, ticks: int = 5) -> float:
    """A round tick step (1, 2, 2.5 or 5 x 10^k) giving about ``ticks`` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / ticks
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw)


@dataclass(frozen=True, slots=True)
class Bar:
    day: str
    x: float
    y: float
    w: float
    h: float
    kwh: float
    over: bool  # above the day's pro-rated share of the cap (or the daily cap)


@dataclass(frozen=True, slots=True)
class Tick:
    pos: float  # y for the value axis, x for the day axis
    value: float
    label: str = ""


@dataclass(slots=True)
class Chart:
    """One chart: axes, ticks and the shapes to draw."""

    width: float = WIDTH
    height: float = HEIGHT
    left: float = LEFT
    top: float = TOP
    plot_w: float = PLOT_W
    plot_h: float = PLOT_H
    bottom_y: float = TOP + PLOT_H
    y_ticks: list[Tick] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    lines: dict[str, str] = field(default_factory=dict)  # name -> SVG points "x,y x,y"
    empty: bool = True  # no day has energy yet


def _axis(top_value: float) -> tuple[float, list[float]]:
    step = nice_step(top_value)
    n = max(1, math.ceil(top_value / step))
    return n * step, [i * step for i in range(n + 1)]


def _day_ticks(days: Sequence[Mapping[str, Any]], x_of: Any) -> list[Tick]:
    n = len(days)
    out = []
    for i, d in enumerate(days):
        dom = int(str(d["day"])[8:10])
        if dom == 1 or dom % 5 == 0 or i == n - 1:
            out.append(Tick(_r(x_of(i)), float(dom), str(dom)))
    return out


def daily(chart: Mapping[str, Any]) -> Chart:
    """Bars of each day's energy, the step line of the pro-rated monthly cap, and
    the daily cap as a horizontal line."""
    days = list(chart["days"])
    n = max(1, len(days))
    slot = PLOT_W / n
    values = [float(d["kwh"]) for d in days if d["kwh"] is not None]
    limits = [float(d["prorated_limit_kwh"]) for d in days
              if d["prorated_limit_kwh"] is not None]
    day_cap = chart.get("daily_limit_kwh")
    top, ticks = _axis(max([*values, *limits, float(day_cap or 0.0), 0.0]) * 1.08 or 1.0)
    c = Chart()

    def y_of(v: float) -> float:
        return TOP + PLOT_H - PLOT_H * v / top

    c.y_ticks = [Tick(_r(y_of(v)), v) for v in ticks]
    c.x_ticks = _day_ticks(days, lambda i: LEFT + slot * (i + 0.5))
    for i, d in enumerate(days):
        if d["kwh"] is None:
            continue
        kwh = float(d["kwh"])
        limit = d["prorated_limit_kwh"]
        over = (limit is not None and kwh > float(limit)) or (
            day_cap is not None and kwh >= float(day_cap))
        y = y_of(kwh)
        c.bars.append(Bar(str(d["day"]), _r(LEFT + slot * i + slot * 0.15), _r(y),
                          _r(slot * 0.7), _r(TOP + PLOT_H - y), kwh, bool(over)))
    c.empty = not c.bars
    if limits and len(limits) == len(days):
        pts = []
        for i, v in enumerate(limits):
            pts += [f"{_r(LEFT + slot * i)},{_r(y_of(v))}", f"{_r(LEFT + slot * (i + 1))},"
                    f"{_r(y_of(v))}"]
        c.lines["prorated"] = " ".join(pts)
    if day_cap is not None:
        y = _r(y_of(float(day_cap)))
        c.lines["daily_cap"] = f"{_r(LEFT)},{y} {_r(LEFT + PLOT_W)},{y}"
    return c


def cumulative(chart: Mapping[str, Any]) -> Chart:
    """The running total at each day's end against the monthly cap (horizontal) and
    the cap's pro-rated path (from 0 at the start to the cap at the end)."""
    days = list(chart["days"])
    n = max(1, len(days))
    slot = PLOT_W / n
    cap = chart.get("limit_kwh")
    running = [float(d["cumulative_kwh"]) for d in days if d["cumulative_kwh"] is not None]
    top, ticks = _axis(max([*running, float(cap or 0.0), 0.0]) * 1.08 or 1.0)
    c = Chart()

    def y_of(v: float) -> float:
        return TOP + PLOT_H - PLOT_H * v / top

    c.y_ticks = [Tick(_r(y_of(v)), v) for v in ticks]
    c.x_ticks = _day_ticks(days, lambda i: LEFT + slot * (i + 1))
    pts = [f"{_r(LEFT)},{_r(y_of(0.0))}"]
    for i, d in enumerate(days):
        if d["cumulative_kwh"] is not None:
            pts.append(f"{_r(LEFT + slot * (i + 1))},{_r(y_of(float(d['cumulative_kwh'])))}")
    c.empty = len(pts) == 1
    if not c.empty:
        c.lines["running"] = " ".join(pts)
    if cap is not None:
        y = _r(y_of(float(cap)))
        c.lines["cap"] = f"{_r(LEFT)},{y} {_r(LEFT + PLOT_W)},{y}"
        path = [f"{_r(LEFT)},{_r(y_of(0.0))}"]
        path += [f"{_r(LEFT + slot * (i + 1))},{_r(y_of(float(d['cumulative_limit_kwh'])))}"
                 for i, d in enumerate(days)]
        c.lines["prorated"] = " ".join(path)
    return c
