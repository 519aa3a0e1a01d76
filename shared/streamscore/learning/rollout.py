"""The online gate: shadow -> canary steps -> production, judged on labelled live events.

A candidate (a shadow version, or the canary) is compared with production on THE SAME events: those
scored by both since the candidate entered its current stage (a shadow since its `shadow` action, a
canary since its latest `canary` step), whose label has arrived. Each version's score of an event is
in `predictions` (the one served) or `shadow_predictions` (the others, scoring/rollout.py), both read
with FINAL. With at least `rollout_min_labelled` such events the verdict is the offline gate's rule
on these events (binary: AUC floor STREAMSCORE_GATE_MIN_AUC and drop STREAMSCORE_GATE_MAX_AUC_DROP;
regression: STREAMSCORE_GATE_MAX_RMSE_INCREASE), with log loss or MAE reported beside:

- a shadow that passes becomes the canary at the first of `rollout_canary_shares` (or is promoted when
  there are none); one that fails is rejected, which stops its shadowing;
- a canary that passes moves to the next share, or after the last is promoted; one that fails is
  rolled back (production serves every entity again): an unhealthy canary never waits for a human;
- before enough labels have arrived, the label-free estimate (drift/reference.py: each version's own
  calibration, or loss model, fitted on its holdout at training time) of both versions on the same
  `rollout_min_labelled` or more scored events: a candidate estimated worse than production by more than
  the drift monitor's estimated-harm threshold (STREAMSCORE_DRIFT_ESTIMATED_AUC_DROP_THRESHOLD, or
  _MAE_RATIO_ for a regression) is rejected / rolled back at once, without waiting for labels. The estimate
  never promotes: only labelled events do (a model's belief in itself is no proof it is right, but a model
  that expects to be much worse than production has said enough);
- a candidate the scorers do not score at all (it failed to load there, e.g. another feature set) while
  production scored `rollout_min_labelled` events since its stage began is unhealthy too: rejected from
  shadow, rolled back from canary.

Every step is a registry action (shadow, canary, promote, reject, rollback) with its evidence (the
labelled events and both versions' metrics); `RolloutController.step` returns their ModelUpdate
records, which the caller publishes (the logger writes them to `model_versions`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from streamscore.clickhouse.store import Store
from streamscore.drift.reference import MONITORING_KEY, window_estimate
from streamscore.learning import training
from streamscore.learning.registry import STAGE_CANARY, STAGE_SHADOW, ModelRegistry, RegistryError
from streamscore.settings import Settings

log = logging.getLogger("streamscore.rollout")


@dataclass(frozen=True)
class OnlineComparison:
    """Scores of production and a candidate on the same labelled events (arrays aligned by event)."""

    production_version: int
    candidate_version: int
    labels: np.ndarray
    production_scores: np.ndarray
    candidate_scores: np.ndarray

    @property
    def labelled(self) -> int:
        return int(self.labels.size)


def scored_since(store: Store, model_name: str, version: int, since_ms: int) -> int:
    """Events `version` scored since `since_ms` (served or in shadow)."""
    return int(store.query(
        "SELECT (SELECT count() FROM predictions FINAL WHERE model_name = {model:String} AND model_version = "
        "{v:UInt32} AND scored_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')) + (SELECT count() FROM "
        "shadow_predictions FINAL WHERE model_name = {model:String} AND model_version = {v:UInt32} AND scored_at >= "
        "fromUnixTimestamp64Milli({since:Int64}, 'UTC'))",
        {"model": model_name, "v": version, "since": int(since_ms)}).rows[0][0])


# Per event scored by both versions since `since`: each one's score (served in predictions, or in shadow).
_BOTH_SCORED = """
            SELECT event_id,
                   anyIf(score, model_version = {production:UInt32}) AS production,
                   anyIf(score, model_version = {candidate:UInt32}) AS candidate,
                   countIf(model_version = {production:UInt32}) AS n_production,
                   countIf(model_version = {candidate:UInt32}) AS n_candidate
            FROM (
                SELECT event_id, model_version, assumeNotNull(score) AS score FROM predictions FINAL
                WHERE model_name = {model:String} AND model_version IN ({production:UInt32}, {candidate:UInt32})
                  AND score IS NOT NULL AND scored_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')
                UNION ALL
                SELECT event_id, model_version, score FROM shadow_predictions FINAL
                WHERE model_name = {model:String} AND model_version IN ({production:UInt32}, {candidate:UInt32})
                  AND scored_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')
            )
            GROUP BY event_id
            HAVING n_production > 0 AND n_candidate > 0"""


def compare_online(store: Store, model_name: str, production: int, candidate: int,
                   since_ms: int) -> OnlineComparison:
    """The labelled events both versions scored since `since_ms` (scored_at, epoch ms), read with FINAL."""
    sql = (f"SELECT s.event_id, s.production, s.candidate, l.label FROM ({_BOTH_SCORED}) AS s "
           "INNER JOIN labels AS l FINAL ON s.event_id = l.event_id ORDER BY s.event_id")
    rows = store.query(sql, {"model": model_name, "production": production, "candidate": candidate,
                             "since": int(since_ms)}).rows
    columns = list(zip(*rows)) if rows else [(), (), (), ()]
    return OnlineComparison(production, candidate, np.asarray(columns[3], dtype=np.float64),
                            np.asarray(columns[1], dtype=np.float64), np.asarray(columns[2], dtype=np.float64))


def paired_scores(store: Store, model_name: str, production: int, candidate: int,
                  since_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """Both versions' scores of every event both scored since `since_ms`, labelled or not."""
    rows = store.query(f"SELECT production, candidate FROM ({_BOTH_SCORED})",
                       {"model": model_name, "production": production, "candidate": candidate,
                        "since": int(since_ms)}).rows
    columns = list(zip(*rows)) if rows else [(), ()]
    return np.asarray(columns[0], dtype=np.float64), np.asarray(columns[1], dtype=np.float64)


@dataclass(frozen=True)
class OnlineVerdict:
    decided: bool  # False: too few labelled events (or one class only) to judge yet
    passed: bool
    reason: str
    evidence: dict[str, float] = field(default_factory=dict)


def judge(comparison: OnlineComparison, objective: str, settings: Settings,
          threshold: float | None = None) -> OnlineVerdict:
    """The offline gate's rule applied to the online comparison (see the module docstring)."""
    n = comparison.labelled
    need = settings.rollout_min_labelled
    evidence: dict[str, float] = {"labelled": float(n)}
    name = f"v{comparison.candidate_version} vs production v{comparison.production_version}"
    if n < need:
        return OnlineVerdict(False, False, f"{name}: {n} of {need} labelled events so far", evidence)
    y = comparison.labels
    if objective == "regression":
        candidate = training.regression_metrics(y, comparison.candidate_scores)
        production = training.regression_metrics(y, comparison.production_scores)
        verdict = training.gate_regression(candidate, production, settings.gate_max_rmse_increase)
        shown = ("rmse", "mae")
    else:
        if y.min() == y.max():
            return OnlineVerdict(False, False, f"{name}: {n} labelled events, all of one class", evidence)
        at = 0.5 if threshold is None else threshold
        candidate = training.classification_metrics(y, comparison.candidate_scores, at)
        production = training.classification_metrics(y, comparison.production_scores, at)
        verdict = training.gate(candidate, production, min_auc=settings.gate_min_auc,
                                max_auc_drop=settings.gate_max_auc_drop)
        shown = ("auc", "log_loss")
    for metric in shown:
        evidence[metric] = float(candidate[metric])
        evidence[f"production_{metric}"] = float(production[metric])
    figures = ", ".join(f"{m} {candidate[m]:.4f} vs {production[m]:.4f}" for m in shown)
    return OnlineVerdict(True, verdict.passed, f"online gate on {n} labelled events, {name}: {figures}; "
                                               f"{verdict.reason}", evidence)


def judge_estimates(production_scores: np.ndarray, candidate_scores: np.ndarray, production_reference: dict,
                    candidate_reference: dict, objective: str, settings: Settings, name: str) -> OnlineVerdict:
    """The label-free early verdict: decided (and failed) only when the candidate expects to be clearly worse
    than production on the same events; never a pass (see the module docstring)."""
    n = int(candidate_scores.size)
    evidence: dict[str, float] = {"scored": float(n)}
    if n < settings.rollout_min_labelled:
        return OnlineVerdict(False, False, f"{name}: {n} events scored by both, too few to estimate", evidence)
    production = window_estimate(objective, production_reference, production_scores)
    candidate = window_estimate(objective, candidate_reference, candidate_scores)
    if production is None or candidate is None:
        return OnlineVerdict(False, False, f"{name}: no label-free estimate (a version without its holdout "
                                           "calibration)", evidence)
    metric = "estimated_mae" if objective == "regression" else "estimated_auc"
    evidence[metric], evidence[f"production_{metric}"] = float(candidate), float(production)
    if objective == "regression":
        limit = settings.drift_estimated_mae_ratio_threshold
        worse = candidate > production * limit
        figures = f"estimated MAE {candidate:.4f} vs {production:.4f} (at most x{limit:g})"
    else:
        limit = settings.drift_estimated_auc_drop_threshold
        worse = production - candidate > limit
        figures = f"estimated AUC {candidate:.4f} vs {production:.4f} (drop at most {limit:g})"
    reason = f"label-free estimate on {n} events scored by both, {name}: {figures}"
    return OnlineVerdict(worse, False, reason + ("; clearly worse, not waiting for labels" if worse else ""),
                         evidence)


@dataclass(frozen=True)
class RolloutStep:
    """One registry action the controller took (for logs, the demo and tests)."""

    version: int
    action: str  # canary | promote | reject | rollback
    reason: str
    evidence: dict[str, float]
    share: float | None = None


class RolloutController:
    """Runs the online gate over the registry's shadow and canary versions (see the module docstring)."""

    def __init__(self, store: Store, registry: ModelRegistry, settings: Settings, objective: str):
        self.store = store
        self.registry = registry
        self.settings = settings
        self.model_name = settings.model_name
        self.objective = objective
        self.steps: list[RolloutStep] = []
        self.last_verdicts: dict[int, OnlineVerdict] = {}

    def step(self) -> list[dict]:
        """Judge every shadow and the canary once; returns the ModelUpdate records of the actions taken."""
        rollout = self.registry.rollout(self.model_name)
        if rollout.production is None:
            return []
        events: list[dict] = []
        if rollout.canary is not None:
            events += self._judge_canary(rollout.production, rollout.canary, rollout.canary_share)
        for version in rollout.shadows:
            events += self._judge_shadow(rollout.production, version)
        return [event for event in events if event]

    def _verdict(self, production: int, version: int, stage: str) -> OnlineVerdict | None:
        since = self.registry.stage_started_at(self.model_name, version, stage)
        if since is None:
            return None
        candidate = self.registry.get(self.model_name, version)
        comparison = compare_online(self.store, self.model_name, production, version, since)
        verdict = judge(comparison, self.objective, self.settings, candidate.threshold)
        if not verdict.decided:
            early = judge_estimates(*paired_scores(self.store, self.model_name, production, version, since),
                                    self.registry.get(self.model_name, production).baseline.get(MONITORING_KEY) or {},
                                    candidate.baseline.get(MONITORING_KEY) or {}, self.objective, self.settings,
                                    f"v{version} vs production v{production}")
            if early.decided:
                verdict = early
        if comparison.labelled == 0 and not verdict.decided:
            production_scored = scored_since(self.store, self.model_name, production, since)
            if (production_scored >= self.settings.rollout_min_labelled
                    and scored_since(self.store, self.model_name, version, since) == 0):
                verdict = OnlineVerdict(True, False, f"v{version} was not scored at all while production "
                                                     f"v{production} scored {production_scored} events since its "
                                                     f"{stage} began: the scorers could not load it (their logs "
                                                     "say why)", {"production_scored": float(production_scored)})
        self.last_verdicts[version] = verdict
        return verdict

    def _judge_shadow(self, production: int, version: int) -> list[dict]:
        verdict = self._verdict(production, version, STAGE_SHADOW)
        if verdict is None or not verdict.decided:
            return []
        if not verdict.passed:
            return [self._act(version, "reject", verdict)]
        shares = self.settings.canary_shares
        if not shares:
            return [self._act(version, "promote", verdict)]
        if self.registry.rollout(self.model_name).canary is not None:
            return []  # one canary at a time: this one stays in shadow until the other is done
        return [self._act(version, "canary", verdict, share=shares[0])]

    def _judge_canary(self, production: int, version: int, share: float) -> list[dict]:
        verdict = self._verdict(production, version, STAGE_CANARY)
        if verdict is None or not verdict.decided:
            return []
        if not verdict.passed:
            return [self._act(version, "rollback", verdict)]
        following = [s for s in self.settings.canary_shares if s > share + 1e-12]
        if following:
            return [self._act(version, "canary", verdict, share=following[0])]
        return [self._act(version, "promote", verdict)]

    def _act(self, version: int, action: str, verdict: OnlineVerdict, share: float | None = None) -> dict:
        registry, name, reason, evidence = self.registry, self.model_name, verdict.reason, verdict.evidence
        try:
            if action == "canary":
                update = registry.canary(name, version, share, reason=reason, evidence=evidence)
            elif action == "promote":
                update = registry.promote(name, version, reason=reason, evidence=evidence)
            elif action == "reject":
                update = registry.reject(name, version, reason, evidence=evidence)
            else:
                update = registry.rollback_canary(name, reason=reason, evidence=evidence)
        except RegistryError as exc:  # someone changed the registry meanwhile: judge again next time
            log.warning("online gate: %s v%d not done: %s", action, version, exc)
            return {}
        self.steps.append(RolloutStep(version, action, reason, evidence, share))
        log.info("online gate: %s v%d%s: %s", action, version, f" (share {share:.0%})" if share else "", reason,
                 extra={"model_name": name, "model_version": version, "action": action,
                        **{k: v for k, v in evidence.items() if math.isfinite(v)}})
        return update.event
