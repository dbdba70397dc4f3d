"""What a request costs: the owner's price table applied to the usage the upstream reported.

A table entry is `name=input/output/cache read/cache write 5m/cache write 1h/web search`: US dollars per million
tokens, web searches per 1,000. Everything after output may be left out: cache prices default to the input price
(no discount, no surcharge) and web searches to $10 per 1,000. The name is a model-name pattern (shell-style,
case-insensitive), a family name, or a service name (`openai`, `anthropic`) as that service's fallback; the first
entry that matches wins.

Costs are whole nano-dollars (10⁻⁹ USD): a price with at most three decimals per million tokens is a whole number of
them per token, so both stores add and compare costs exactly, with integers.
"""

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from llmproxy.api import ANTHROPIC, OPENAI
from llmproxy.api.usage import PROMPT_FIGURES, Usage
from llmproxy.config import ConfigError
from llmproxy.services.gemini import DEFAULT_PRICES as GEMINI_PRICES

NANODOLLARS_PER_USD = 10**9
DEFAULT_WEB_SEARCH_PRICE = Decimal(10)  # USD per 1,000 searches: Anthropic's and OpenAI's web search, 2025
# Prices as OpenAI and Anthropic published them in November 2025, USD per million tokens (input/output/cache
# read/cache write 5m/1h). OpenAI caches by itself and bills no cache writes; Anthropic's cache writes cost 1.25×
# (5 minutes) and 2× (1 hour) the input price, its cache reads 0.1×. Each service's fallback is its dearest
# current general model (gpt-4o's input, Opus 4.1), so that a USD quota does not under-count a model not listed.
DEFAULT_PRICES = [
    "gpt-5*-pro*=15/120/15/0/0",
    "gpt-5*-mini*=0.25/2/0.025/0/0",
    "gpt-5*-nano*=0.05/0.4/0.005/0/0",
    "gpt-5*=1.25/10/0.125/0/0",
    "gpt-4.1-mini*=0.4/1.6/0.1/0/0",
    "gpt-4.1-nano*=0.1/0.4/0.025/0/0",
    "gpt-4.1*=2/8/0.5/0/0",
    "gpt-4o-mini*=0.15/0.6/0.075/0/0",
    "gpt-4o*=2.5/10/1.25/0/0",
    "chatgpt-4o*=5/15/5/0/0",
    "o4-mini*=1.1/4.4/0.275/0/0",
    "o3-mini*=1.1/4.4/0.55/0/0",
    "o3-pro*=20/80/20/0/0",
    "o3*=2/8/0.5/0/0",
    "o1-mini*=1.1/4.4/0.55/0/0",
    "o1*=15/60/7.5/0/0",
    "codex-mini*=1.5/6/0.375/0/0",
    "gpt-4-turbo*=10/30/10/0/0",
    "gpt-4=30/60/30/0/0",
    "gpt-4-0*=30/60/30/0/0",
    "gpt-3.5-turbo*=0.5/1.5/0.5/0/0",
    "text-embedding-3-small*=0.02/0",
    "text-embedding-3-large*=0.13/0",
    "text-embedding-ada*=0.1/0",
    "openai=2.5/10/1.25/0/0",
    "claude-opus-4-0*=15/75/1.5/18.75/30",
    "claude-opus-4-1*=15/75/1.5/18.75/30",
    "claude-opus-4-2*=15/75/1.5/18.75/30",
    "claude-3-opus*=15/75/1.5/18.75/30",
    "claude-opus-*=5/25/0.5/6.25/10",
    "claude-3-haiku*=0.25/1.25/0.03/0.3/0.5",
    "claude-3-5-haiku*=0.8/4/0.08/1/1.6",
    "claude-haiku-*=1/5/0.1/1.25/2",
    "claude-*sonnet*=3/15/0.3/3.75/6",
    "anthropic=15/75/1.5/18.75/30",
    *GEMINI_PRICES,
]
_FIELDS = "input/output[/cache read[/cache write 5m[/cache write 1h[/web search]]]]"


@dataclass(frozen=True)
class Price:
    """USD per million tokens of each kind, and per 1,000 web searches."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    web_search: Decimal

    def cost(self, usage: Usage) -> int:
        """The usage's cost in nano-dollars, rounded up."""
        tokens = (
            usage.input * self.input
            + usage.output * self.output
            + usage.cache_read * self.cache_read
            + usage.cache_write_5m * self.cache_write_5m
            + usage.cache_write_1h * self.cache_write_1h
        )
        return math.ceil(tokens * 1000 + usage.web_searches * self.web_search * 1_000_000)

    def worst_case(self, prompt: int, output: int) -> int:
        """The most a request can cost in nano-dollars: its prompt at the dearest input-side price (a cache write
        costs up to twice the input), its whole output allowance at the output price."""
        return math.ceil((prompt * getattr(self, self.dearest_prompt_kind()) + output * self.output) * 1000)

    def dearest_prompt_kind(self) -> str:
        """The prompt's kind (input or a cache kind) with the highest price, input among equals."""
        return max(PROMPT_FIGURES, key=lambda kind: getattr(self, kind))


UNPRICED = Price(*(Decimal(0),) * 6)


def usd(nanodollars: int) -> float:
    return nanodollars / NANODOLLARS_PER_USD


def format_usd(dollars: float) -> str:
    """Cents from one cent up, else four significant digits: `$12.35`, `$0.001015`."""
    if dollars >= 0.01 or not dollars:
        return f"${dollars:,.2f}"
    decimals = 3 - math.floor(math.log10(dollars))  # four significant digits, never an exponent
    return f"${dollars:.{decimals}f}".rstrip("0")


def _amount(text: str) -> Decimal:
    """A non-negative number of dollars; InvalidOperation for anything else."""
    amount = Decimal(text.strip())
    if not amount.is_finite() or amount < 0:
        raise InvalidOperation
    return amount


def parse_prices(entries: Sequence[str]) -> list[tuple[str, Price]]:
    """MODEL_PRICES as (name, price) in order; each service needs its fallback entry."""
    table = []
    for entry in entries:
        name, _, figures = entry.partition("=")
        try:
            numbers = [_amount(figure) for figure in figures.split("/")]
        except InvalidOperation:
            numbers = []
        if not name.strip() or not 2 <= len(numbers) <= 6:
            raise ConfigError(
                f"MODEL_PRICES entries look like model-pattern={_FIELDS} (USD per million tokens, web searches "
                f"per 1,000), not {entry!r}."
            )
        given, output, *rest = numbers
        read, write_5m, write_1h = (rest + [given] * 3)[:3]
        search = rest[3] if len(rest) == 4 else DEFAULT_WEB_SEARCH_PRICE
        table.append((name.strip().lower(), Price(given, output, read, write_5m, write_1h, search)))
    if missing := [api for api in (OPENAI, ANTHROPIC) if api not in {name for name, _ in table}]:
        raise ConfigError(f"MODEL_PRICES needs a fallback entry for each service: add {missing[0]}={_FIELDS}.")
    return table


def price_of(table: list[tuple[str, Price]], service: str, model: str, family: str, fallback: str = "") -> Price:
    """The first entry naming the model (by pattern), its family or its service; else the `fallback` entry (the
    service's price_fallback: Azure's models cost OpenAI's prices); else nothing (a local model the owner did not
    price)."""
    model = model.lower()
    named = (family, service)
    if found := next((price for name, price in table if name in named or fnmatch.fnmatchcase(model, name)), None):
        return found
    return next((price for name, price in table if name == fallback), UNPRICED)


def parse_cost_quotas(entries: Sequence[str], families: list[str]) -> dict[str, int]:
    """COST_QUOTAS: `family=usd` or `total=usd` entries, in nano-dollars."""
    quotas = {}
    for entry in entries:
        name, _, amount = (part.strip() for part in entry.partition("="))
        try:
            quotas[name] = int(_amount(amount) * NANODOLLARS_PER_USD)
        except InvalidOperation:
            raise ConfigError(f"COST_QUOTAS entries look like family=usd or total=usd, not {entry!r}.") from None
        if name not in families and name != "total":
            raise ConfigError(f"COST_QUOTAS names no model family of this proxy: {name!r}.")
    return quotas
