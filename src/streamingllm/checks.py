"""Argument validation: the one place that turns a bad value into a clear message.

Messages speak in the library's parameter names (``window_size must be an integer >= 1, got 0``).
:class:`ArgumentError` keeps the parameter apart from the requirement, so the command line can
show the same message with the parameter written as its flag (``--window-size``) without
checking anything a second time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real

_MISSING = object()


class ArgumentError(ValueError):
    """A bad argument value.

    Attributes:
        param: the Python parameter's name (``window_size``).
        requirement: what the value must be (``must be an integer >= 1``).
        mentions: other parameters named in ``requirement``, rewritten as flags by :meth:`as_flag`.
    """

    def __init__(self, param: str, requirement: str, value=_MISSING, *, mentions: tuple[str, ...] = ()):
        self.param, self.requirement, self.mentions = param, requirement, mentions
        self.got = "" if value is _MISSING else f", got {value!r}"
        super().__init__(f"{param} {requirement}{self.got}")

    def as_flag(self) -> str:
        """The message with the parameter (and those it mentions) written as command-line flags."""
        requirement = self.requirement
        for name in self.mentions:
            requirement = requirement.replace(name, flag_of(name))
        return f"{flag_of(self.param)} {requirement}{self.got}"


class ArgumentTypeError(ArgumentError, TypeError):
    """A bad argument of the wrong type (also a ``TypeError``)."""


def flag_of(param: str) -> str:
    """The command-line flag of a Python parameter: ``window_size`` -> ``--window-size``."""
    return "--" + param.replace("_", "-")


def check_int(param: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound optional); bools are refused."""
    lo = "" if minimum is None else f" >= {minimum}"
    hi = "" if maximum is None else f" <= {maximum}"
    need = f"must be an integer{lo}{' and' if lo and hi else ''}{hi}"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ArgumentTypeError(param, need, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ArgumentError(param, need, value)
    return int(value)


def check_optional_int(param: str, value, minimum: int | None = None) -> int | None:
    """As :func:`check_int`, but ``None`` passes through."""
    return None if value is None else check_int(param, value, minimum)


def check_float(param: str, value, minimum: float | None = None, maximum: float | None = None,
                *, open_min: bool = False) -> float:
    """``value`` as a finite ``float`` in the given range (``open_min``: strictly above ``minimum``)."""
    lo = "" if minimum is None else f" {'>' if open_min else '>='} {minimum:g}"
    hi = "" if maximum is None else f" <= {maximum:g}"
    need = f"must be a number{lo}{' and' if lo and hi else ''}{hi}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ArgumentTypeError(param, need, value)
    value = float(value)
    low_bad = minimum is not None and (value <= minimum if open_min else value < minimum)
    if not math.isfinite(value) or low_bad or (maximum is not None and value > maximum):
        raise ArgumentError(param, need, value)
    return value


def check_choice(param: str, value, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; the message lists them."""
    if value not in allowed:
        raise ArgumentError(param, f"must be one of {', '.join(map(str, allowed))}", value)
    return value


def check_choices(param: str, values, allowed: Sequence[str]) -> tuple[str, ...]:
    """One or more of ``allowed``, without repeats, returned in ``allowed``'s order."""
    values = (values,) if isinstance(values, str) else tuple(values)
    if not values:
        raise ArgumentError(param, f"must name at least one of {', '.join(allowed)}")
    for v in values:
        check_choice(param, v, allowed)
    if len(set(values)) != len(values):
        raise ArgumentError(param, "must not name a value twice", list(values))
    return tuple(a for a in allowed if a in values)


def check_int_list(param: str, values, minimum: int | None = None, *, unique: bool = True) -> list[int]:
    """A non-empty list of integers, each checked by :func:`check_int` (and distinct with ``unique``)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ArgumentTypeError(param, "must be a list of integers", values)
    out = [check_int(param, v, minimum) for v in values]
    if not out:
        raise ArgumentError(param, "must list at least one value")
    if unique and len(set(out)) != len(out):
        raise ArgumentError(param, "must not repeat a value", out)
    return out
