"""hydra.sweeper.params (and sweeps on the command line) as Optuna distributions.

Each value is read with Hydra's override grammar:

    interval(a, b)             a float drawn uniformly from [a, b]
    tag(log, interval(a, b))   the same on a log scale
    tag(int, interval(a, b))   an int (tag(int, log, ...): on a log scale)
    choice(a, b, ...)  a,b,c   one of the values
    range(a, b, step)          a, a+step, ... below b (Optuna: a stepped int or float)
    anything else              a fixed override, the same in every trial
"""

import math
from collections.abc import Iterable, Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from .dlrun_optuna_sweeper import user_error

Space = dict[str, BaseDistribution]


def search_space(
    params: Mapping[str, Any] | None, arguments: Iterable[str]
) -> tuple[Space, list[str]]:
    """(the distributions by override key, the fixed overrides every trial gets): from
    hydra.sweeper.params first, then the command line's overrides (which win)."""
    parser = OverridesParser.create()
    space: Space = {}
    fixed: dict[str, str] = {}
    lines = [f"{key}={value}" for key, value in (params or {}).items()]
    for line in [*lines, *arguments]:
        try:
            override = parser.parse_override(line)
        except Exception as err:  # Hydra's grammar error: say which entry
            raise user_error(f"hydra.sweeper.params: '{line}' does not parse ({err}).") from None
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override, line)
        else:
            fixed[key] = line
    return space, list(fixed.values())


def distribution(override: Override, line: str) -> BaseDistribution:
    value = override.value()
    log = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):  # Hydra reads its bounds as floats
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log)  # type: ignore[arg-type]
        return FloatDistribution(float(value.start), float(value.end), log=log)  # type: ignore[arg-type]
    if isinstance(value, RangeSweep):
        if log:
            raise user_error(
                f"'{line}': a range is stepped; for a log scale use tag(log, interval(a, b))."
            )
        start, stop, step = value.start, value.stop, value.step
        count = math.ceil((stop - start) / step)  # type: ignore[operator]
        if count < 1 or step <= 0:  # type: ignore[operator]
            raise user_error(f"'{line}' holds no value (range(start, stop, step) with step > 0).")
        high = start + (count - 1) * step  # type: ignore[operator]
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(int(start), int(high), step=int(step))  # type: ignore[arg-type]
        return FloatDistribution(float(start), float(high), step=float(step))  # type: ignore[arg-type]
    if isinstance(value, ChoiceSweep):
        choices = list(value.list)
        if any(isinstance(c, (list, dict)) for c in choices) or not choices:
            raise user_error(f"'{line}': a choice takes plain values (numbers, strings, null).")
        return CategoricalDistribution(choices)
    raise user_error(
        f"'{line}' is a sweep Optuna cannot draw from: use interval(a, b), "
        "tag(log, interval(a, b)), choice(a, b, ...) or range(a, b, step)."
    )


def grid(space: Space) -> dict[str, list[Any]]:
    """hydra.sweeper.sampler=grid: every parameter's values (choices, stepped ranges)."""
    values: dict[str, list[Any]] = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            values[key] = list(dist.choices)
        elif isinstance(dist, (IntDistribution, FloatDistribution)) and dist.step is not None:
            n = round((dist.high - dist.low) / dist.step) + 1
            values[key] = [dist.low + k * dist.step for k in range(n)]
        else:
            raise user_error(
                f"hydra.sweeper.sampler=grid needs a finite set of values, but {key} is a "
                "continuous interval: use choice(...) or range(a, b, step)."
            )
    return values


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    """A trial's parameters as overrides: `key=value`."""
    return [f"{key}={value}" for key, value in params.items()]
