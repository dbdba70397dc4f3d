"""Unit tests of the usage per day and family: the names of the daily counters, their reading into days and families,
and the SVG chart drawn of them (read back with xml.etree, as a browser would parse it)."""

import itertools
import math
import xml.etree.ElementTree as ElementTree
from datetime import date

import pytest

from llmproxy.usage_days import day_counter, last_days, parse_day_counter
from llmproxy.web.chart import (
    NANOUSD,
    PALETTE,
    PLOT_BOTTOM,
    PLOT_HEIGHT,
    TOKENS,
    WIDTH,
    DayFigures,
    Unit,
    stacked_bars_svg,
    usage_by_day,
)

SVG = "{http://www.w3.org/2000/svg}"
DAYS = last_days(date(2026, 12, 4), 30)
EXACT = Unit("things", str, str)  # amounts as they are, so that the axis can be read back


def parsed(svg: str) -> ElementTree.Element:
    root = ElementTree.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def segments(root: ElementTree.Element) -> dict[str, ElementTree.Element]:
    """The bars' segments by their tooltip (the legend's swatches have none of their own)."""
    return {
        rect.findtext(f"{SVG}title"): rect for rect in root.iter(f"{SVG}rect") if rect.find(f"{SVG}title") is not None
    }


def y_ticks(root: ElementTree.Element) -> list[tuple[float, str]]:
    """The y axis's labels, bottom up: (y, label)."""
    ticks = [(float(text.get("y")), text.text) for text in root.iter(f"{SVG}text") if text.get("text-anchor") == "end"]
    return sorted(ticks, reverse=True)


# -- counter names and days --------------------------------------------------------------------------------


def test_last_days_end_today_and_cross_months_and_years():
    assert last_days(date(2027, 1, 2), 4) == ["2026-12-30", "2026-12-31", "2027-01-01", "2027-01-02"]
    assert len(DAYS) == 30 and DAYS[0] == "2026-11-05" and DAYS[-1] == "2026-12-04"
    assert last_days(date(2028, 3, 1), 2) == ["2028-02-29", "2028-03-01"]


def test_a_day_counter_name_reads_back_and_other_names_do_not():
    assert parse_day_counter(day_counter("2026-12-04", "tokens", "gpt4o")) == ("2026-12-04", "tokens", "gpt4o")
    assert parse_day_counter(day_counter("2026-12-04", "prompts", "ns:a b")) == ("2026-12-04", "prompts", "ns:a b")
    for name in (
        "tokens:gpt4o",
        "day:2026-12-04:tokens",  # no family
        "day:2026-12-04:tokens:",
        "day:2026-12-04:dollars:gpt4o",  # not a figure
        "day:2026-13-01:tokens:gpt4o",  # not a date
        "day:20261204:tokens:gpt4o",  # a date, but not as the writer writes it
        "xday:2026-12-04:tokens:gpt4o",
        "",
    ):
        assert parse_day_counter(name) is None, name


# -- usage_by_day ------------------------------------------------------------------------------------------


def test_usage_by_day_reads_the_days_counters_and_ignores_the_rest():
    counters = {
        day_counter("2026-12-04", "tokens", "gpt4o"): 120,
        day_counter("2026-12-04", "cost_nanousd", "gpt4o"): 900,
        day_counter("2026-12-04", "prompts", "gpt4o"): 2,
        day_counter("2026-11-05", "tokens", "claude"): 7,  # the first day of the window
        day_counter("2026-12-01", "tokens", "gpt4o"): 30,
        day_counter("2026-12-01", "prompts", "gpt4o"): 1,
        day_counter("2026-11-04", "tokens", "gemini"): 1000,  # the day before the window
        day_counter("2026-12-05", "tokens", "gemini"): 1000,  # tomorrow (another instance's clock)
        "day:2026-12-04:dollars:gpt4o": 5,
        "day:garbage": 5,
        "tokens:gpt4o": 150,
        "prompts": 3,
    }
    usage = usage_by_day(counters, DAYS)
    assert usage.days == DAYS and usage.families == ["claude", "gpt4o"]
    assert usage.by_day["2026-12-04"] == {"claude": DayFigures(), "gpt4o": DayFigures(120, 900, 2)}
    assert usage.by_day["2026-11-05"] == {"claude": DayFigures(tokens=7), "gpt4o": DayFigures()}
    assert set(usage.by_day) == set(DAYS) and all(
        set(families) == {"claude", "gpt4o"} for families in usage.by_day.values()
    )
    assert usage.totals == {"claude": DayFigures(tokens=7), "gpt4o": DayFigures(150, 900, 3)}
    tokens = usage.series("tokens")
    assert list(tokens) == ["claude", "gpt4o"] and all(len(amounts) == 30 for amounts in tokens.values())
    assert (tokens["gpt4o"][-1], tokens["gpt4o"][-4], tokens["claude"][0], sum(tokens["gpt4o"])) == (120, 30, 7, 150)
    assert usage.series("prompts")["gpt4o"][-1] == 2


def test_usage_by_day_of_no_counters_is_empty():
    usage = usage_by_day({"tokens": 5}, DAYS)
    assert (usage.families, usage.totals, usage.series("tokens")) == ([], {}, {})
    assert usage.by_day == {day: {} for day in DAYS}


# -- the chart ---------------------------------------------------------------------------------------------


def test_bar_segments_are_proportional_and_stacked():
    series = {"gpt4o": [0] * 27 + [100, 0, 300], "claude": [0] * 27 + [50, 400, 25]}
    root = parsed(stacked_bars_svg(DAYS, series, TOKENS))
    drawn = segments(root)
    expected = {
        "2026-12-02 gpt4o: 100 tokens": 100,
        "2026-12-04 gpt4o: 300 tokens": 300,
        "2026-12-02 claude: 50 tokens": 50,
        "2026-12-03 claude: 400 tokens": 400,
        "2026-12-04 claude: 25 tokens": 25,
    }
    assert set(drawn) == set(expected)  # a day without an amount draws nothing
    per_unit = {title: float(drawn[title].get("height")) / amount for title, amount in expected.items()}
    assert max(per_unit.values()) - min(per_unit.values()) < 0.001
    tallest = float(drawn["2026-12-03 claude: 400 tokens"].get("height"))
    assert 0.4 * PLOT_HEIGHT <= tallest <= PLOT_HEIGHT  # the axis ends near the tallest bar, not far above it
    lower, upper = drawn["2026-12-04 gpt4o: 300 tokens"], drawn["2026-12-04 claude: 25 tokens"]
    assert float(lower.get("y")) + float(lower.get("height")) == pytest.approx(PLOT_BOTTOM, abs=0.01)
    assert float(upper.get("y")) + float(upper.get("height")) == pytest.approx(float(lower.get("y")), abs=0.01)
    assert lower.get("x") == upper.get("x")
    assert float(drawn["2026-12-02 gpt4o: 100 tokens"].get("x")) < float(lower.get("x"))  # the oldest day left
    assert lower.get("fill") == PALETTE[0] and upper.get("fill") == PALETTE[1]  # each family its own colour


@pytest.mark.parametrize("top", [1, 2, 3, 5, 7, 10, 99, 101, 12_345, 40_000, 40_001, 999_999, 3 * 10**12])
def test_the_y_axis_has_three_to_five_round_ticks_from_zero_past_the_tallest_bar(top):
    root = parsed(stacked_bars_svg(DAYS, {"gpt4o": [0] * 29 + [top]}, EXACT))
    ticks = y_ticks(root)
    values = [int(label) for _, label in ticks]
    assert 3 <= len(values) <= 5 and values[0] == 0 and values[-1] >= top
    step = values[1]
    assert values == list(range(0, values[-1] + 1, step))
    assert step / 10 ** math.floor(math.log10(step)) in (1, 2, 2.5, 5)  # round
    assert values[-2] < top or len(values) == 3  # no more ticks than needed
    spacing = [lower[0] - upper[0] for lower, upper in itertools.pairwise(ticks)]
    assert max(spacing) - min(spacing) < 0.02  # evenly spaced (to the hundredth the chart writes)
    (bar,) = segments(root).values()
    assert float(bar.get("height")) == pytest.approx(top / values[-1] * PLOT_HEIGHT, abs=0.01)


def test_axis_labels_and_tooltips_read_in_the_unit():
    root = parsed(stacked_bars_svg(DAYS, {"claude": [0] * 29 + [54_900_000]}, NANOUSD))
    assert list(segments(root)) == ["2026-12-04 claude: $0.05"]
    assert [label for _, label in y_ticks(root)] == ["$0.00", "$0.02", "$0.04", "$0.06"]
    small = parsed(stacked_bars_svg(DAYS, {"claude": [0] * 29 + [90_000_000]}, NANOUSD))  # steps of $0.025
    assert [label for _, label in y_ticks(small)] == ["$0.00", "$0.025", "$0.05", "$0.075", "$0.10"]
    large = parsed(stacked_bars_svg(DAYS, {"claude": [0] * 29 + [1_800 * 10**9]}, NANOUSD))
    assert [label for _, label in y_ticks(large)] == ["$0.00", "$500.00", "$1k", "$1.5k", "$2k"]
    tokens = parsed(stacked_bars_svg(DAYS, {"gpt4o": [0] * 29 + [1_234_567]}, TOKENS))
    assert list(segments(tokens)) == ["2026-12-04 gpt4o: 1,234,567 tokens"]
    assert [label for _, label in y_ticks(tokens)] == ["0", "500k", "1M", "1.5M"]


def test_dates_label_every_few_days_ending_today():
    root = parsed(stacked_bars_svg(DAYS, {"gpt4o": [1] * 30}, TOKENS))
    labels = [text.text for text in root.iter(f"{SVG}text") if text.get("text-anchor") == "middle"]
    assert labels == ["11-09", "11-14", "11-19", "11-24", "11-29", "12-04"]


def test_family_names_are_escaped():
    hostile = "<script>alert(1)</script>"
    quoting = "a\"b'c&d"
    svg = stacked_bars_svg(DAYS, {hostile: [0] * 29 + [5], quoting: [0] * 29 + [5]}, TOKENS)
    assert "<script" not in svg and "&lt;script&gt;alert(1)&lt;/script&gt;" in svg
    assert 'a"b' not in svg and "a&quot;b&#x27;c&amp;d" in svg
    root = parsed(svg)
    assert not [element for element in root.iter() if element.tag.removeprefix(SVG) == "script"]
    assert set(segments(root)) == {f"2026-12-04 {hostile}: 5 tokens", f"2026-12-04 {quoting}: 5 tokens"}
    legend = {text.text for text in root.iter(f"{SVG}text") if text.get("text-anchor") is None}
    assert legend == {hostile, quoting}


def test_an_empty_month_draws_an_empty_chart_with_a_note():
    for series in ({}, {"gpt4o": [0] * 30}):
        root = parsed(stacked_bars_svg(DAYS, series, TOKENS))
        assert not list(root.iter(f"{SVG}rect"))  # no bar, no legend
        assert "no usage in the last 30 days" in [text.text for text in root.iter(f"{SVG}text")]
        assert y_ticks(root) == []


def test_the_chart_scales_and_its_legend_stays_within_it():
    families = {f"family-{i}-with-a-rather-long-name-indeed": [0] * 29 + [i + 1] for i in range(12)}
    root = parsed(stacked_bars_svg(DAYS, {"a": [0] * 30, **families}, TOKENS))
    x, y, width, height = (float(n) for n in root.get("viewBox").split())
    assert (x, y, width) == (0, 0, WIDTH) and root.get("width") == str(WIDTH)
    swatches = [rect for rect in root.iter(f"{SVG}rect") if rect.find(f"{SVG}title") is None]
    assert len(swatches) == 12  # "a" has no amount: not in the legend
    assert all(float(rect.get("x")) + 10 <= width and float(rect.get("y")) + 10 <= height for rect in swatches)
    assert len({rect.get("y") for rect in swatches}) > 1  # the legend wraps into rows
    names = [text.text for text in root.iter(f"{SVG}text") if text.get("text-anchor") is None]
    assert all(len(name) <= 28 for name in names) and names[0].endswith("…")  # cut, and whole in its tooltip
    # A family's colour is its place in the series, drawn or not: the same families keep their colours in each chart.
    assert [rect.get("fill") for rect in swatches] == [PALETTE[i % len(PALETTE)] for i in range(1, 13)]
