"""Typed dataclass configs built from profile/row mappings: unknown keys are an error that names the
closest valid key, YAML lists become tuples, and each config validates itself."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing

from segsde.errors import SegSDEError

PRECISIONS = ("auto", "bf16", "fp32")  # of the networks' passes: see segsde.runtime.autocast


def closest_hint(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {sorted(valid)}"


def config_from_dict(cls, values: dict, where: str):
    """``cls(**values)`` for a frozen dataclass with a ``validate(where)`` method."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SegSDEError(f"unknown key '{unknown[0]}' in {where}: {closest_hint(unknown[0], fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _typed(k, v, hints[k], where) for k, v in values.items()}
    try:
        cfg = cls(**values)
    except TypeError as exc:
        raise SegSDEError(f"{where}: {exc}") from exc
    cfg.validate(where)
    return cfg


def _typed(key: str, value, hint, where: str):
    """``value`` as the field's scalar type where the YAML gave it otherwise: YAML 1.1 reads ``1e-3`` (no dot) as
    a string, which would otherwise fail deep inside a worker; a value of the wrong kind is a one-line error."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in args:
        return None
    if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in args):
        return tuple(value)
    kind = next((k for k in (bool, int, float) if k in args), None)  # the field's scalar type, if it has one
    if kind is None:
        return value
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if kind is bool:
        fits = isinstance(value, bool)
    else:  # a bool is an int to Python, never a number here
        fits = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    if not fits:
        raise SegSDEError(f"{where}: {key} must be {'true or false' if kind is bool else f'a number ({kind.__name__})'}, not {value!r}")
    return float(value) if kind is float else value


def check(checks: list[tuple[bool, str]], where: str) -> None:
    for ok, message in checks:
        if not ok:
            raise SegSDEError(f"{where}: {message}")
