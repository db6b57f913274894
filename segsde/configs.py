"""Typed dataclass configs built from profile/row mappings: unknown keys are an error that names the
closest valid key, YAML lists become tuples, and each config validates itself."""

from __future__ import annotations

import dataclasses
import difflib
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
    values = {k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v for k, v in values.items()}
    try:
        cfg = cls(**values)
    except TypeError as exc:
        raise SegSDEError(f"{where}: {exc}") from exc
    cfg.validate(where)
    return cfg


def check(checks: list[tuple[bool, str]], where: str) -> None:
    for ok, message in checks:
        if not ok:
            raise SegSDEError(f"{where}: {message}")
