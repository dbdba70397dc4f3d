"""The quota arithmetic: a request's worst case in tokens, the times quotas start afresh, the original project's
quota settings, and the sentence for a request over quota.
"""

import re
from dataclasses import dataclass
from datetime import datetime

from cronsim import CronSim, CronSimError

from llmproxy.api.usage import CHARACTERS_PER_TOKEN
from llmproxy.config import ConfigError
from llmproxy.pricing import format_usd, usd

DEFAULT_OUTPUT_RESERVATION = 4096  # reserved when a request does not say how much it may produce
_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_tokens_to_sample")
_SCHEDULES = {"hourly": "0 * * * *", "daily": "0 0 * * *"}


def prompt_estimate(body: dict) -> int:
    """An upper estimate of the prompt's tokens: every string in it at 3 characters a token, 4 tokens a message."""
    characters, messages = 0, 0
    stack = [body.get(field) for field in ("messages", "system", "prompt", "input", "instructions")]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            characters += len(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            messages += len(value)
            stack.extend(value)
    return characters // (CHARACTERS_PER_TOKEN - 1) + 4 * messages + 1


def output_reservation(body: dict) -> int:
    config = body.get("generationConfig")  # Gemini's output limit sits in it
    limits = (
        *(body.get(field) for field in _OUTPUT_FIELDS),
        config.get("maxOutputTokens") if isinstance(config, dict) else None,
    )
    for value in limits:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_OUTPUT_RESERVATION


def next_refresh(period: str, after: datetime) -> datetime:
    """The first minute after `after` (local wall-clock time) that a QUOTA_REFRESH_PERIOD names: hourly, daily or a
    five-field cron expression, read as Debian's cron does. A bad period raises ValueError with the reason."""
    schedule = _SCHEDULES.get(period, period)
    if (fields := len(schedule.split())) != 5:  # cronsim would also take a sixth field, for seconds
        raise ValueError(f"a cron expression has 5 fields, this one {fields}")
    try:
        upcoming = next(CronSim(schedule, after), None)
    except CronSimError as error:
        raise ValueError(str(error).lower()) from None
    if upcoming is None:
        raise ValueError("it names no time in the next 50 years")
    return upcoming


def legacy_quota_settings(environment: dict[str, str], families: list[str]) -> list[str]:
    """`TOKEN_QUOTA_<FAMILY>=N` settings of the original project as `family=N` entries (GPT4_32K is gpt4-32k)."""
    by_name = {re.sub(r"[^A-Z0-9]", "_", family.upper()): family for family in families}
    entries = []
    for name, value in environment.items():
        family = by_name.get(name.removeprefix("TOKEN_QUOTA_"))
        if family is None:
            raise ConfigError(f"{name} names no model family of this proxy.")
        entries.append(f"{family}={value.strip()}")
    return entries


def over_quota_message(
    user: dict,
    family: str,
    tokens: int,
    cost: int,
    limit: int | None,
    cost_limit: int | None,
    total_cost_limit: int | None,
) -> str:
    """Why a reservation did not fit, from the user's figures as read just before (requests in flight included):
    the first quota the request's worst case is over, else the first quota there is."""
    figures = user["usage"].get(family, {})
    taken = figures.get("used", 0) + figures.get("reserved", 0)
    if limit is not None and (taken + tokens > limit or (cost_limit is None and total_cost_limit is None)):
        return (
            f"This request could use up to {tokens} tokens, more than is left of your {family} quota "
            f"({max(0, limit - taken)} of {limit})."
        )
    spent = figures.get("cost_nanousd", 0) + figures.get("reserved_nanousd", 0)
    if cost_limit is not None and (spent + cost > cost_limit or total_cost_limit is None):
        quota, name = cost_limit, f"{family} budget"
    else:
        quota, name = total_cost_limit, "budget for all models"
        spent = sum(f.get("cost_nanousd", 0) + f.get("reserved_nanousd", 0) for f in user["usage"].values())
    return (
        f"This request could cost up to {format_usd(usd(cost))}, more than is left of your {name} "
        f"({format_usd(usd(max(0, quota - spent)))} of {format_usd(usd(quota))})."
    )


@dataclass
class Reservation:
    """What a request may use at most, as the quota keeper estimated it before sending it."""

    user: str
    family: str
    tokens: int
    prompt_estimate: int
    cost: int  # nano-dollars; 0 when not held
    held: bool = True  # set aside in the store; a user without limits holds nothing back

    @property
    def held_tokens(self) -> int:
        return self.tokens if self.held else 0
