"""Model families: groups of models that share keys, limits and a queue.

A family table per service maps model-name patterns to family names, first match first; the last entry of
each table is that service's fallback family and catches the service's other model names. A model no entry
matches is unknown and refused.
"""

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from llmproxy.config import ConfigError

# Names the original project used in settings; each stands for the families it covered there.
LEGACY_ALIASES = {
    "claude": ["claude", "claude-opus", "claude-sonnet", "claude-haiku"],
    "gpt432k": ["gpt4-32k"],
}


@dataclass(frozen=True)
class FamilyRule:
    family: str
    patterns: tuple[str, ...]

    def matches(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.patterns)


def parse_table(name: str, entries: Sequence[str]) -> list[FamilyRule]:
    """`family=pattern|pattern` entries, in order."""
    rules = []
    for entry in entries:
        family, sep, patterns = entry.partition("=")
        if not sep or not family.strip() or not patterns.strip():
            raise ConfigError(f"{name.upper()} entries look like family=pattern|pattern, not {entry!r}.")
        rules.append(FamilyRule(family.strip(), tuple(p.strip().lower() for p in patterns.split("|") if p.strip())))
    if not rules:
        raise ConfigError(f"{name.upper()} needs at least one family.")
    return rules


def parse_family_numbers(name: str, entries: Sequence[str]) -> dict[str, int]:
    """`family=number` entries (token quotas, context windows) as a mapping."""
    numbers = {}
    for entry in entries:
        family, _, number = entry.partition("=")
        if not number.strip().isdigit():
            raise ConfigError(f"{name.upper()} entries look like family=tokens, not {entry!r}.")
        numbers[family.strip()] = int(number)
    return numbers
