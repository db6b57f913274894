"""Typed access to ``ablations/profiles.yaml``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from segsde.configs import check, config_from_dict
from segsde.errors import SegSDEError

# profiles.yaml, component_study.yaml and sweep_space.yaml: the repository's, or a copy of the folder
# with your own rows and profiles named by $SEGSDE_ABLATIONS (read at import, inherited by Ray workers)
ABLATIONS_DIR = Path(os.environ.get("SEGSDE_ABLATIONS") or Path(__file__).resolve().parent.parent / "ablations").absolute()
PROFILES_FILE = ABLATIONS_DIR / "profiles.yaml"


@dataclass(frozen=True)
class DataProfile:
    source: str  # "synthetic" or "cityscapes"
    size: tuple[int, ...]  # H, W
    train: int = 0
    val: int = 0
    tune: int = 0  # the tuning split a sweep's search scores on (synthetic; Cityscapes: the build's tune cities)

    def validate(self, where: str) -> None:
        check([(self.source in ("synthetic", "cityscapes"), "source must be 'synthetic' or 'cityscapes'"),
               (len(self.size) == 2 and min(self.size) > 0, "size must be [height, width]"),
               (min(self.train, self.val, self.tune) >= 0, "train, val and tune must be >= 0")], where)


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
    return config_from_dict(DataProfile, section, f"the data section of profile '{name}' in {path}")


def section_config(cls, profile: str, section: str, sets: dict | None = None, **flags):
    """A profile's ``study`` or ``sweep`` section as ``cls``: the section, then the flags that were given (None keeps
    the section's), then ``--set`` pairs on top of its trainer overrides, through ``config_from_dict``."""
    values = {**(load_profile(profile).get(section) or {}), **{k: v for k, v in flags.items() if v is not None}, "profile": profile}
    if sets:
        values["train"] = {**(values.get("train") or {}), **sets}
    return config_from_dict(cls, values, f"the {section} section of profile '{profile}'")
