"""The library versions below which the proxy refuses to start."""

from importlib.metadata import version

from llmproxy.config import ConfigError

# Versions below these accept request-smuggling tricks (h11 chunk terminators, h2 header handling).
SECURITY_FLOORS = {"mitmproxy": (12, 1, 2), "h11": (0, 16, 0), "h2": (4, 3, 0)}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def check_versions() -> None:
    """Refuses to start on a library version below its security floor."""
    for package, floor in SECURITY_FLOORS.items():
        installed = version(package)
        if _version_tuple(installed) < floor:
            raise ConfigError(
                f"{package} {installed} is below the security floor {'.'.join(map(str, floor))}; "
                "run ./run.sh again to install the pinned versions."
            )
