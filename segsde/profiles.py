"""Typed access to ``ablations/profiles.yaml``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from segsde.errors import SegSDEError

# profiles.yaml, component_study.yaml and sweep_space.yaml: the repository's, or a copy of the folder
# with your own rows and profiles named by $SEGSDE_ABLATIONS (read at import, inherited by Ray workers)
ABLATIONS_DIR = Path(os.environ.get("SEGSDE_ABLATIONS") or Path(__file__).resolve().parent.parent / "ablations").absolute()
PROFILES_FILE = ABLATIONS_DIR / "profiles.yaml"


@dataclass(frozen=True)
class DataProfile:
    source: str  # "synthetic" or "cityscapes"
    size: tuple[int, int]  # H, W
    train: int = 0
    val: int = 0


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SegSDEError(f"{path} does not exist: restore it from the repository") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise SegSDEError(f"{path} is not valid YAML{line}: fix the syntax") from exc
    if not isinstance(data, dict):
        raise SegSDEError(f"{path} must hold a mapping of names to settings: fix its top level")
    return data


def load_profile(name: str, path: Path = PROFILES_FILE) -> dict:
    profiles = load_yaml(path)
    if name not in profiles:
        import difflib

        close = difflib.get_close_matches(name, profiles, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {sorted(profiles)}"
        raise SegSDEError(f"unknown profile '{name}' in {path}: {hint}")
    return profiles[name]


def data_profile(name: str, path: Path = PROFILES_FILE) -> DataProfile:
    section = load_profile(name, path).get("data")
    if not isinstance(section, dict):
        raise SegSDEError(f"profile '{name}' in {path} has no 'data' mapping: add one")
    try:
        return DataProfile(source=section["source"], size=tuple(section["size"]),
                           train=int(section.get("train", 0)), val=int(section.get("val", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise SegSDEError(f"profile '{name}' data section in {path} is incomplete ({exc}): give source and size") from exc
