"""Usage per UTC day and family, kept as store counters named `day:<YYYY-MM-DD>:<figure>:<family>`.

The quota keeper adds them with each settlement (the same write as the other counters); the stores keep them apart
from the others (`Store.daily_counters`), so the status page, which reads every counter each second or two, does not
read a list that grows by a few counters per family each day.
"""

from datetime import UTC, date, datetime, timedelta

DAY_PREFIX = "day:"
DAY_FIGURES = ("tokens", "cost_nanousd", "prompts")  # cost in nano-dollars, as the other counters


def utc_today() -> date:
    return datetime.now(UTC).date()


def day_counter(day: str, figure: str, family: str) -> str:
    """The counter of a figure (one of DAY_FIGURES) of a family on a day (ISO date)."""
    return f"{DAY_PREFIX}{day}:{figure}:{family}"


def parse_day_counter(name: str) -> tuple[str, str, str] | None:
    """(day, figure, family) of a counter `day_counter` named, or None for any other name."""
    if not name.startswith(DAY_PREFIX):
        return None
    day, _, rest = name.removeprefix(DAY_PREFIX).partition(":")
    figure, _, family = rest.partition(":")  # a family name may hold colons: it comes last
    if figure not in DAY_FIGURES or not family or not _is_iso_date(day):
        return None
    return day, figure, family


def _is_iso_date(text: str) -> bool:
    try:
        return date.fromisoformat(text).isoformat() == text  # not the other forms fromisoformat takes (20261204)
    except ValueError:
        return False


def last_days(today: date, count: int) -> list[str]:
    """The `count` days up to and including `today`, oldest first, as ISO dates."""
    return [(today - timedelta(days=back)).isoformat() for back in range(count - 1, -1, -1)]
