"""A study's claims (the profile's ``study.claims``, e.g. the paper's five), each answered from the comparison lines
it names: it holds when every line is judged better, does not hold when one is judged worse, is not tested when a
component did not act, and is otherwise not resolved at the seeds run, with the seeds its lines need for the
study's minimal effect and what those seeds would cost on the machine that ran the study."""

from __future__ import annotations

import numpy as np
import pandas as pd

from segsde.errors import SegSDEError
from segsde.orchestration.comparison import BASELINE, line_name


def claim_lines(spec: str) -> tuple[str, str]:
    """A claim's line as (row, reference): "A:B" is A against B, a row alone is the row against Baseline."""
    row, _, reference = spec.partition(":")
    return row, reference or BASELINE


def check_claims(claims: dict, rows: tuple[str, ...], pairs: tuple[tuple[str, str], ...]) -> None:
    """One line naming the first claim line the study does not compare (a row it lacks, or a pair not in ``compare``)."""
    for claim, lines in claims.items():
        if not lines:
            raise SegSDEError(f"claim '{claim}' names no comparison: list rows (against Baseline) or A:B pairs of study.compare")
        for spec in lines:
            row, reference = claim_lines(spec)
            known = (reference == BASELINE and row in rows and row != BASELINE) or (row, reference) in pairs
            if not known:
                raise SegSDEError(f"claim '{claim}': the study does not compare '{spec}'; name a row of the study (against "
                                  f"Baseline) or add the pair to study.compare (--compare {row}:{reference})")


def claim_verdicts(comparison: pd.DataFrame, claims: dict, seconds: dict, concurrency: int) -> pd.DataFrame:
    """One line per (claim, budget): the verdict and each of its comparisons in brief. ``seconds``: {row: mean
    seconds of one trial}, the cost of the seeds an unresolved claim needs, at ``concurrency`` trials at once."""
    out = []
    for budget in sorted(comparison.budget.unique()):
        at = comparison[comparison.budget == budget].set_index(["row", "reference"])
        for claim, lines in claims.items():
            found = [at.loc[claim_lines(spec)] for spec in lines]
            names = [line_name(*claim_lines(spec)) for spec in lines]
            verdict, needs, cost = _verdict(found, names, lines, seconds, concurrency)
            out.append({"claim": claim, "budget": int(budget), "verdict": verdict, "n": int(min(c.n for c in found)),
                        "seeds_needed": needs, "hours_needed": cost,
                        "evidence": "; ".join(_brief(name, c) for name, c in zip(names, found))})
    return pd.DataFrame(out, columns=["claim", "budget", "verdict", "n", "seeds_needed", "hours_needed", "evidence"])


def _verdict(found: list, names: list[str], lines: list[str], seconds: dict, concurrency: int) -> tuple[str, float, float]:
    n = min(int(c.n) for c in found)
    silent = [(name, c.verdict) for name, c in zip(names, found) if not c.acted]
    if silent:
        return f"not tested: {silent[0][0]}: {silent[0][1]}", np.nan, np.nan
    if n < 2:
        return f"not resolved: {n} seed{'s' if n != 1 else ''} (no interval)", np.nan, np.nan
    worse = [name for name, c in zip(names, found) if c.verdict.startswith("worse")]
    if worse:
        return f"does not hold: {', '.join(worse)} judged the other way", np.nan, np.nan
    if all(c.verdict.startswith("better") for c in found):
        return "holds", np.nan, np.nan
    open_lines = [c for c in found if not c.verdict.startswith("better")]
    needs = max((c.seeds_needed for c in open_lines if c.seeds_needed == c.seeds_needed), default=np.nan)
    rows = {r for spec in lines for r in claim_lines(spec)}
    per_seed = sum(seconds.get(r, np.nan) for r in rows)
    hours = needs * per_seed / 3600 / concurrency if needs == needs else np.nan
    if needs != needs:
        return f"not resolved at {n} seeds (no number of seeds would: the validation images' noise alone is too large)", needs, hours
    return f"not resolved at {n} seeds (needs {needs:.0f}, costing {hours:.1f} h)", needs, hours


def _brief(name: str, c) -> str:
    if not c.acted:
        return f"{name}: not compared (did not act)"
    if c.delta != c.delta:
        return f"{name}: –"
    interval = f" [{c.ci_low:+.2f}, {c.ci_high:+.2f}]" if c.ci_low == c.ci_low else ""
    p = f", p {c.p_holm:.3f}" if c.p_holm == c.p_holm else ""
    return f"{name} {c.delta:+.2f}{interval}{p}"


def claims_markdown(verdicts: pd.DataFrame, min_effect: float, concurrency: int) -> str:
    """The claims as a table a person reads, saying what "needs" and "costing" mean."""
    lines = [f"Claims (each holds when all its comparisons are judged better; \"needs\": the seeds for 80 % power to find "
             f"{min_effect:g} points, \"costing\": those seeds of its rows, {concurrency} trials at once on the machine "
             "that ran the study)", "", "| claim | labels | verdict | Δ [95 % interval], p (Holm) |", "|---|---|---|---|"]
    lines += [f"| {v.claim} | {v.budget} | {v.verdict} | {v.evidence} |" for v in verdicts.itertuples()]
    return "\n".join(lines)
