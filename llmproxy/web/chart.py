"""Usage per day and family for the owner's page: the figures, read from `Store.daily_counters`, and a stacked bar
chart of them drawn on the server as SVG markup (the pages run no JavaScript).

    days = last_days(utc_today(), 30)
    usage = usage_by_day(store.daily_counters(days[0]), days)
    svg = stacked_bars_svg(usage.days, usage.series("tokens"), TOKENS)
"""

import html
import math
from collections.abc import Callable
from dataclasses import dataclass

from llmproxy.pricing import NANODOLLARS_PER_USD, format_usd, usd
from llmproxy.usage_days import DAY_FIGURES, parse_day_counter

# Okabe and Ito's colours, which colour-blind viewers tell apart, with a grey for their yellow (too pale on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000", "#888888")


@dataclass
class DayFigures:
    """What a family used: on a day, or over the days of a UsageDays."""

    tokens: int = 0
    cost_nanousd: int = 0  # 10⁻⁹ USD, as the store counts it
    prompts: int = 0


@dataclass(frozen=True)
class UsageDays:
    """Usage per day and family over some days."""

    days: list[str]  # ISO dates, oldest first
    families: list[str]  # every family with a counter on one of the days, by name
    by_day: dict[str, dict[str, DayFigures]]  # day -> family -> figures, for every day and family
    totals: dict[str, DayFigures]  # family -> its figures over all the days

    def series(self, figure: str) -> dict[str, list[int]]:
        """Family -> a figure of DAY_FIGURES on each day, oldest first: what stacked_bars_svg draws."""
        return {family: [getattr(self.by_day[day][family], figure) for day in self.days] for family in self.families}


def usage_by_day(counters: dict[str, int], days: list[str]) -> UsageDays:
    """The usage that daily counters (Store.daily_counters) record on `days` (ISO dates, oldest first, as last_days
    gives them); counters of other days and other names are left out."""
    window = set(days)
    found: dict[tuple[str, str], DayFigures] = {}
    for name, amount in counters.items():
        if (parsed := parse_day_counter(name)) and parsed[0] in window:
            day, figure, family = parsed
            figures = found.setdefault((day, family), DayFigures())
            setattr(figures, figure, getattr(figures, figure) + amount)
    families = sorted({family for _, family in found})
    by_day = {day: {family: found.get((day, family), DayFigures()) for family in families} for day in days}
    totals = {
        family: DayFigures(
            **{figure: sum(getattr(by_day[day][family], figure) for day in days) for figure in DAY_FIGURES}
        )
        for family in families
    }
    return UsageDays(days, families, by_day, totals)


def _compact(amount: float) -> str:
    """An amount in three digits at most, for an axis: 750, 2.5k, 1.25M."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if amount >= size:
            return f"{amount / size:.3g}{suffix}"
    return f"{amount:.3g}"


def _short_usd(nanodollars: int) -> str:
    """An amount of nano-dollars for an axis: $0.50, $0.025, $2.5k (rounded to cents, $0.025 would read $0.03)."""
    dollars = usd(nanodollars)
    if dollars >= 1000:
        return f"${_compact(dollars)}"
    if nanodollars % (NANODOLLARS_PER_USD // 100) == 0:
        return f"${dollars:.2f}"
    return f"${dollars:.3g}" if dollars >= 0.01 else format_usd(dollars)  # .3g would write $6e-05


@dataclass(frozen=True)
class Unit:
    """What a chart's amounts are, and how they read: in full in a tooltip, short on the axis."""

    name: str
    full: Callable[[int], str]
    short: Callable[[int], str]


TOKENS = Unit("tokens", lambda amount: f"{amount:,} tokens", _compact)
NANOUSD = Unit("cost", lambda amount: format_usd(usd(amount)), _short_usd)

WIDTH = 480  # small enough that its text stays legible when the page shrinks it to a 375 px phone screen
FONT_SIZE = 12
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_HEIGHT = 60, WIDTH - 20, 12, 200
PLOT_BOTTOM = PLOT_TOP + PLOT_HEIGHT
LEGEND_TOP = PLOT_BOTTOM + 32
LEGEND_ROW = 18
LEGEND_NAME_LENGTH = 28  # characters; a longer family name is cut, and whole in its tooltip
X_LABELS = 6  # about as many dates under the bars


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _tick_step(top: int) -> int:
    """The smallest round whole step (1, 2, 2.5 or 5 times a power of ten) of which four reach `top`. The next
    smaller step is at most 2.5 times smaller and four of it fell short, so it takes two steps at least to reach top
    (unless top <= 4): with 0, an axis of 3 to 5 ticks."""
    magnitude = 1
    while True:
        for step in (magnitude, 2 * magnitude, 5 * magnitude // 2, 5 * magnitude):  # 5 // 2: 2 again, 2.5 not whole
            if step * 4 >= top:
                return step
        magnitude *= 10


def stacked_bars_svg(days: list[str], series: dict[str, list[int]], unit: Unit = TOKENS) -> str:
    """A stacked bar chart as SVG markup, safe to embed in HTML as is: one bar per day of `days` (ISO dates, oldest
    first, at least one), stacked by family from `series` (family -> its amount on each day) in its order, with a y
    axis, a legend and a tooltip on each segment. A family's colour is its place in `series`, so that charts of the
    same families agree; families without any amount are left out."""
    colours = {family: PALETTE[index % len(PALETTE)] for index, family in enumerate(series)}
    shown = {family: colours[family] for family, amounts in series.items() if any(amounts)}  # family -> colour
    legend, legend_height = _legend(shown)
    height = LEGEND_TOP + legend_height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}"'
        f' role="img" aria-label="{_escape(f"{unit.name} per day and family, {days[0]} to {days[-1]}")}"'
        f' font-family="system-ui, sans-serif" font-size="{FONT_SIZE}">'
    ]
    slot = (PLOT_RIGHT - PLOT_LEFT) / len(days)
    top = max((sum(series[family][i] for family in shown) for i in range(len(days))), default=0)
    if top:
        step = _tick_step(top)
        axis_top = max(2, math.ceil(top / step)) * step
        parts += _y_axis(step, axis_top, unit)
        parts += _bars(days, series, shown, slot, axis_top, unit)
    else:
        parts.append(
            f'<text x="{_number((PLOT_LEFT + PLOT_RIGHT) / 2)}" y="{_number(PLOT_TOP + PLOT_HEIGHT / 2)}"'
            f' text-anchor="middle" fill="#555">no usage in the last {len(days)} days</text>'
        )
    parts.append(f'<line x1="{PLOT_LEFT}" y1="{PLOT_BOTTOM}" x2="{PLOT_RIGHT}" y2="{PLOT_BOTTOM}" stroke="#888"/>')
    every = math.ceil(len(days) / X_LABELS)
    for index, day in enumerate(days):
        if (len(days) - 1 - index) % every == 0:  # counted from the newest day, which is always labelled
            parts.append(
                f'<text x="{_number(PLOT_LEFT + (index + 0.5) * slot)}" y="{PLOT_BOTTOM + 16}" text-anchor="middle"'
                f' fill="#333">{_escape(day[5:])}</text>'
            )
    parts += legend
    parts.append("</svg>")
    return "".join(parts)


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _y_axis(step: int, axis_top: int, unit: Unit) -> list[str]:
    parts = []
    for tick in range(0, axis_top + 1, step):
        y = _number(PLOT_BOTTOM - tick / axis_top * PLOT_HEIGHT)
        if tick:
            parts.append(f'<line x1="{PLOT_LEFT}" y1="{y}" x2="{PLOT_RIGHT}" y2="{y}" stroke="#ddd"/>')
        parts.append(
            f'<text x="{PLOT_LEFT - 6}" y="{y}" dy="0.35em" text-anchor="end" fill="#333">'
            f"{_escape(unit.short(tick))}</text>"
        )
    return parts


def _bars(
    days: list[str], series: dict[str, list[int]], shown: dict[str, str], slot: float, axis_top: int, unit: Unit
) -> list[str]:
    parts = []
    width = _number(slot * 0.75)
    for index, day in enumerate(days):
        x, y = _number(PLOT_LEFT + (index + 0.125) * slot), float(PLOT_BOTTOM)
        for family, colour in shown.items():
            if amount := series[family][index]:
                height = amount / axis_top * PLOT_HEIGHT
                y -= height  # the first family at the bottom
                parts.append(
                    f'<rect x="{x}" y="{_number(y)}" width="{width}" height="{_number(height)}" fill="{colour}"'
                    ' stroke="#fff" stroke-width="0.5">'
                    f"<title>{_escape(f'{day} {family}: {unit.full(amount)}')}</title></rect>"
                )
    return parts


def _legend(shown: dict[str, str]) -> tuple[list[str], int]:
    """The legend's markup, in rows of swatches and names as wide as the chart, and its height."""
    parts, x, row = [], PLOT_LEFT, 0
    for family, colour in shown.items():
        name = family if len(family) <= LEGEND_NAME_LENGTH else family[: LEGEND_NAME_LENGTH - 1] + "…"
        width = 14 + len(name) * FONT_SIZE * 0.6  # a swatch, a gap, and the name at about a character's width
        if x > PLOT_LEFT and x + width > WIDTH:
            x, row = PLOT_LEFT, row + 1
        y = LEGEND_TOP + row * LEGEND_ROW
        parts.append(
            f"<g><title>{_escape(family)}</title>"
            f'<rect x="{_number(x)}" y="{y}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{_number(x + 14)}" y="{y + 9}" fill="#333">{_escape(name)}</text></g>'
        )
        x += width + 16
    return parts, (row + 1) * LEGEND_ROW if shown else 0
