"""dlrun: config-driven training of the classic deep-learning networks."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`dlrun.load` imports torch on first use only: `import dlrun` (and `dlrun --help`) stay light."""
    if name == "load":
        from dlrun.api import load

        return load
    raise AttributeError(f"module 'dlrun' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "load"])
