"""A whole selection as one Ray Train job: the diversity features (sde, diversity), then round by round a
model trained from scratch on the images picked so far, its scores of the rest, and the picks (IFP or
top-k), made on rank 0 and broadcast.

One job instead of one per round: each Ray Train job costs about 15 s of start-up on a 2-core CPU, which
was a third of the `quick` study's selection stages. A checkpoint after the features, after every round
and every ``checkpoint_interval`` training steps holds the picks so far, so a restarted or rerun job
continues where it stopped (Ray Train finds it under the same run name).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from segsde.data.splits import random_order
from segsde.data.store import local_dataset
from segsde.runtime import progress, report, resume_state, start_worker, stream_seed, worker_tags
from segsde.selection.config import NEEDS_FEATURES, NEEDS_STUDENT, SelectionConfig
from segsde.selection.ifp import farthest_points, random_projection, standardise
from segsde.selection.jobs import broadcast, compute_features, score_candidates, train_round
from segsde.storage import localize

RESULT_FILE = "selection.pt"


def round_of(rank: int, budgets: tuple[int, ...]) -> int:
    """The round whose budget first includes position ``rank`` (0 = the initial set)."""
    return next(r for r, b in enumerate(budgets) if rank < b)


def new_record(sid: str, **parts) -> dict:
    """One pick: its id and the parts of its score (None where the method has none)."""
    return {"id": sid, "score": None, "distance": None, "difficulty": None, "entropy": None, **parts}


def ranked(records: list[dict], budgets: tuple[int, ...]) -> list[dict]:
    """The picks in order, each with its rank and the round that added it."""
    return [{**rec, "rank": k, "round": round_of(k, budgets)} for k, rec in enumerate(records)]


def selection_loop(config: dict) -> None:
    """``config``: ``select`` (SelectionConfig fields), ``method``, ``data``, ``pool`` (the candidate ids),
    ``sde_model`` (sde, diversity, difficulty) and the run to tag (``tracking_uri``, ``mlflow_run_id``). Reports
    the ordered records and each round's seconds and mean score in RESULT_FILE."""
    cfg = SelectionConfig.from_dict(config["select"])
    worker = start_worker(cfg.threads, stream_seed("select/init", cfg.seed), cfg.precision)
    if worker.is_main and config.get("mlflow_run_id"):  # where it runs now: a lost node's watch reads it
        from segsde.tracking import RunLogger

        RunLogger(config["tracking_uri"], config["mlflow_run_id"]).tags(worker_tags(worker))
    config = {**config, "data": str(local_dataset(config["data"])),  # read from this node's copies
              "sde_model": str(localize(config["sde_model"])) if config.get("sde_model") else None}
    rounds = Rounds(config["method"], cfg, config["data"], config["pool"], config.get("sde_model"), worker,
                    resume_state(None, worker.device) or {})
    records = rounds.run()
    payload = {"records": records, "rounds": rounds.stats} if worker.is_main else None
    report(worker, {"picked": len(records)}, files={RESULT_FILE: payload})


class Rounds:
    """The picks of ``method`` over ``pool``; ``state`` is a checkpoint's (empty when starting afresh)."""

    def __init__(self, method: str, cfg: SelectionConfig, data: str, pool: list[str], sde_model: str | None, worker,
                 state: dict):
        self.method, self.cfg, self.data, self.pool, self.sde_model, self.worker = method, cfg, data, pool, sde_model, worker
        self.index = {sid: k for k, sid in enumerate(pool)}
        self.records: list[dict] = state.get("records", [])
        self.stats: list[dict] = state.get("stats", [])          # per round: seconds and mean score
        self.raw_features: torch.Tensor | None = state.get("features")
        self.partial = state if "model" in state else None      # a round stopped mid-training

    # -- checkpoints -------------------------------------------------------------------------------------
    def checkpoint(self, **training) -> None:
        state = {"records": self.records, "stats": self.stats, "features": self.raw_features, **training}
        report(self.worker, {"picked": len(self.records)}, state=state)

    def _add(self, sid: str, **parts) -> None:
        self.records.append(new_record(sid, **parts))

    def _share_picks(self) -> None:
        self.records = broadcast(self.worker, self.records)
        self.checkpoint()

    # -- the two kinds of work ---------------------------------------------------------------------------
    def features(self) -> torch.Tensor | None:
        """[N, D] standardised layer-6 features in pool order on rank 0 (None elsewhere)."""
        cfg = self.cfg
        if self.raw_features is None:
            if self.worker.is_main:
                progress(f"[select] layer-6 features of {len(self.pool)} images from {self.sde_model}")
            self.raw_features = compute_features(cfg, self.data, self.pool, self.sde_model, self.worker)
            self.checkpoint()
        if not self.worker.is_main:
            return None
        feats = standardise(self.raw_features.float())
        if feats.numel() > cfg.max_exact_values:
            progress(f"[select] {feats.shape[0]} x {feats.shape[1]} features exceed max_exact_values: "
                     f"IFP on a random projection to {cfg.projection_dim} dimensions")
            feats = random_projection(feats, cfg.projection_dim, cfg.seed)
        return feats

    def round_scores(self, kind: str, r: int) -> dict[str, float]:
        """Round r's model trained on the picks so far; its score of every other image (rank 0)."""
        selected = [x["id"] for x in self.records]
        chosen = set(selected)
        candidates = [i for i in self.pool if i not in chosen]
        steps = self.cfg.round_steps(r)
        round_cfg = replace(self.cfg, seed=self.cfg.seed * 1000 + r)
        if self.worker.is_main:
            progress(f"[select] round {r}: training a {kind} model {steps} steps on {len(selected)} images, "
                     f"then scoring {len(candidates)}")
        t0 = time.perf_counter()
        resume = self.partial if self.partial is not None and self.partial.get("round") == r else None
        self.partial = None
        model = train_round(kind, round_cfg, self.data, selected, steps, self.worker, resume,
                            lambda training: self.checkpoint(round=r, **training))
        scores = score_candidates(kind, model, round_cfg, self.data, candidates, self.worker)
        if self.worker.is_main:
            self.stats.append({"round": r, "seconds": time.perf_counter() - t0,
                               "mean_score": float(np.mean(list(scores.values())))})
        return scores

    # -- the picks ---------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        cfg, budgets = self.cfg, self.cfg.budgets
        if self.method in NEEDS_FEATURES:
            self._farthest_point_rounds(self.features())
        else:
            kind, part = ("student", "difficulty") if self.method in NEEDS_STUDENT else ("segmentation", "entropy")
            if not self.records:
                for sid in random_order(self.pool, cfg.seed)[: budgets[0]]:
                    self._add(sid)
            for r in range(1, len(budgets)):
                if len(self.records) >= budgets[r]:
                    continue
                scores = self.round_scores(kind, r)
                if self.worker.is_main:
                    top = sorted(scores, key=lambda i: (-scores[i], self.index[i]))[: budgets[r] - len(self.records)]
                    for sid in top:
                        self._add(sid, score=scores[sid], **{part: scores[sid]})
                self._share_picks()
        return ranked(self.records, budgets)

    def _farthest_point_rounds(self, feats: torch.Tensor | None) -> None:
        cfg, budgets, main = self.cfg, self.cfg.budgets, self.worker.is_main
        if not self.records:
            start = int(np.random.default_rng(cfg.seed).integers(len(self.pool)))
            self._add(self.pool[start])
        # diversity reaches the largest budget in one IFP pass; sde stops at each budget for a new student
        goals = [budgets[-1]] if self.method == "diversity" else budgets
        nearest = None
        for r, goal in enumerate(goals):
            if len(self.records) >= goal:
                continue
            scores = self.round_scores("student", r) if r > 0 else {}
            if main:
                bonus = None
                if r > 0:
                    bonus = torch.zeros(len(self.pool))
                    for sid, e in scores.items():
                        bonus[self.index[sid]] = e
                selected = [self.index[x["id"]] for x in self.records]
                picks, gaps, nearest = farthest_points(feats, selected, goal - len(selected), bonus, cfg.weight if r else 0.0, nearest)
                for j, gap in zip(picks, gaps.tolist()):
                    e = scores.get(self.pool[j])
                    self._add(self.pool[j], distance=gap, difficulty=e, score=gap + (cfg.weight * e if e is not None else 0.0))
            self._share_picks()
