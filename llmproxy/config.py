"""Reads the proxy's settings: config.yaml, then a .env file, then the environment, the last one winning.

Every setting is named once, in snake_case: `model_rate_limit` in config.yaml is `MODEL_RATE_LIMIT` in the
environment and the mitmproxy option `model_rate_limit` (`--set model_rate_limit=8` on the command line wins
over all three). Secrets (API keys, passwords) are settings too, but they never become mitmproxy options,
because mitmweb shows every option to whoever opens its UI.
"""

import csv
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml
from dotenv.parser import parse_stream

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"

# Secrets besides the services' keys (each service names its own key setting, a comma-separated list).
SECRET_VALUES = ("proxy_key", "admin_key")  # taken whole: a password may contain a comma
LISTEN_SETTINGS = ("port", "bind_address", "log_level")  # read by the entry point, not mitmproxy options
SERVICES = "services"  # the declared OpenAI-compatible services (llmproxy/services/compatible.py), read once
# Size suffixes as mitmproxy's `human.parse_size` reads them: MAX_REQUEST_BODY also sets mitmproxy's body_size_limit.
SIZE_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class ConfigError(Exception):
    """A setting that stops start-up; its message is one sentence for the operator."""


def read_dotenv(path: Path) -> dict[str, str]:
    """NAME=value lines as python-dotenv reads them (`#` comments, `export`, quotes), taken literally: no ${NAME}
    interpolation. A line it cannot read stops start-up: `dotenv_values` would skip it with a warning, and the
    skipped line may be a key, or an unclosed quote that swallowed the lines after it."""
    values = {}
    try:
        with path.open(encoding="utf-8-sig") as stream:  # -sig: a byte-order mark would become part of a name
            for binding in parse_stream(stream):
                if binding.error or (binding.key is not None and binding.value is None):
                    raise ConfigError(f"{path}: line {binding.original.line} is not of the form NAME=value.")
                if binding.key is not None:
                    values[binding.key] = binding.value
    except OSError as error:
        raise ConfigError(f"Cannot read {path}: {error.strerror}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text.") from None
    return values


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"Cannot read the configuration file {path}: {error.strerror}.") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise ConfigError(f"The configuration file {path} is not valid YAML{line}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"The configuration file {path} must be a mapping of setting names to values.")
    return data


def parse_size(value: str) -> int:
    """A size with an optional b, k, m, g or t suffix (`4m`, `256k`) in bytes; ValueError for anything else."""
    try:
        return int(value)
    except ValueError:
        pass
    if value[-1:] in SIZE_UNITS:
        return int(value[:-1]) * SIZE_UNITS[value[-1]]
    raise ValueError(f"not a size: {value!r}")


def size_setting(name: str, value: str, example: str) -> int:
    """A size option (`4m`, `256k`) in bytes; a value that is none stops start-up naming the setting."""
    try:
        return parse_size(value)
    except ValueError:
        raise ConfigError(f"{name.upper()} must be a size such as {example}, not {value!r}.") from None


def split_list(value: str) -> list[str]:
    """A comma-separated value; items may be quoted to contain commas."""
    return [item.strip() for item in next(csv.reader([value], skipinitialspace=True), []) if item.strip()]


def convert(name: str, value: object, typespec: object) -> object:
    """`value` (from YAML or the environment) as the type mitmproxy declared for the option."""
    env_name = name.upper()
    optional = typing.get_origin(typespec) in (typing.Union, types.UnionType)
    if optional:
        if value is None or value == "":
            return None
        typespec = next(t for t in typing.get_args(typespec) if t is not type(None))
    if typespec is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        raise ConfigError(f"{env_name} must be true or false, not {value!r}.")
    if typespec is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{env_name} must be a whole number, not {value!r}.") from None
    if typespec is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{env_name} must be a single value, not a list or mapping.")
        return "" if value is None else str(value)
    if typing.get_origin(typespec) in (Sequence, list) or typespec in (Sequence[str], list[str]):
        if value is None:
            return []
        if isinstance(value, str):
            return split_list(value)
        if isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
            return [str(item) for item in value]
        raise ConfigError(f"{env_name} must be a list of strings.")
    raise ConfigError(f"{env_name} has a type this loader does not know ({typespec}).")


class ConfigSources:
    """config.yaml (or PROXY_CONFIG), `.env` in the working directory, and the environment, merged."""

    def __init__(self, environ: Mapping[str, str] = os.environ):
        self.path = Path(environ["PROXY_CONFIG"]) if environ.get("PROXY_CONFIG") else DEFAULT_CONFIG
        self.from_file = _read_yaml(self.path)
        dotenv_path = Path.cwd() / ".env"
        self.from_env = {**(read_dotenv(dotenv_path) if dotenv_path.is_file() else {}), **environ}

    def _value_of(self, name: str) -> tuple[bool, object]:
        if name.upper() in self.from_env:
            return True, self.from_env[name.upper()]
        if name in self.from_file:
            return True, self.from_file[name]
        return False, None

    def secrets(self, key_settings: Iterable[str]) -> dict[str, list[str] | str]:
        """The services' keys (`key_settings`) as de-duplicated lists, passwords as stripped strings (empty when
        unset)."""
        secrets: dict[str, list[str] | str] = {
            name: list(dict.fromkeys(convert(name, self._value_of(name)[1], Sequence[str]))) for name in key_settings
        }
        for name in SECRET_VALUES:
            secrets[name] = str(self._value_of(name)[1] or "").strip()
        return secrets

    def prefixed(self, prefix: str) -> dict[str, str]:
        """Environment (and .env) settings whose names start with `prefix`, such as TOKEN_QUOTA_GPT4."""
        return {name: value for name, value in self.from_env.items() if name.startswith(prefix)}

    def declared_services(self) -> object:
        """The SERVICES setting as YAML read it (a list of mappings, if well formed); in the environment it is YAML
        or JSON text."""
        present, value = self._value_of(SERVICES)
        if present and isinstance(value, str):
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError("SERVICES must be a YAML or JSON list of services.") from None
        return value

    def listen_address(self) -> tuple[str, int]:
        """(BIND_ADDRESS, PORT)."""
        port = self.value("port", int, 7860)
        if not 0 <= port <= 65535:
            raise ConfigError(f"PORT must be between 0 and 65535, not {port}.")
        return self.value("bind_address", str, "") or "127.0.0.1", port

    def value(self, name: str, typespec: object, default: object) -> object:
        """One setting, typed, or `default` when it is set nowhere."""
        present, value = self._value_of(name)
        return convert(name, value, typespec) if present else default

    def options(self, option_types: Mapping[str, object], key_settings: Iterable[str]) -> dict[str, object]:
        """Typed values for the options in `option_types` (name -> mitmproxy typespec) that are set anywhere; the
        services' `key_settings` are settings too, though never options."""
        known = set(option_types) | set(key_settings) | set(SECRET_VALUES) | set(LISTEN_SETTINGS) | {SERVICES}
        unknown = sorted(set(self.from_file) - known)
        if unknown:
            raise ConfigError(f"{self.path} names a setting this proxy does not have: {unknown[0]!r}.")
        values = {}
        for name, typespec in option_types.items():
            present, value = self._value_of(name)
            if present:
                values[name] = convert(name, value, typespec)
        return values
