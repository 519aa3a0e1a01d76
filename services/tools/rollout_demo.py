"""`streamscore demo --rollout`: a model version released like software — shadow, online gate, canary, promotion,
and a worse version stopped on the live stream.

Runs after the demo's infra step, in the same namespace, with scorer, logger and trainer as threads of this
process (the trainer runs the online gate, streamscore.learning.rollout):

1. history at full speed, v1 trained from ClickHouse and promoted;
2. live events; a retrain request on the `retrain` topic (as the schedule issues them): the trainer trains
   v2, which passes the offline gate and goes into shadow (STREAMSCORE_ROLLOUT_AUTO_SHADOW);
3. more live events with their labels: the online gate compares v2 with v1 on the same labelled events,
   moves it to a canary (10 %, then 50 % of entities), judges it again at each step and promotes it;
4. a deliberately worse version (trained on shuffled labels) goes into shadow (v3) and another one is
   made the canary (v4): the gate rejects v3 and rolls v4 back; neither is ever promoted;
5. figures: every registry action with its evidence, shadow against production by SQL, the canary's
   actual share of entities; the HTML report plots shadow scores against production.
"""
from __future__ import annotations

import functools
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from streamscore.avro.codec import AvroCodec
from streamscore.clickhouse.store import Store
from streamscore.dev.generators import generator_ending_now
from streamscore.learning import training
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retraining import train_and_register
from streamscore.learning.training_set import load_training_set
from streamscore.services.runner import ServiceGroup
from streamscore.services.tools.drift_demo import wait_for as wait_for_at_most
from streamscore.settings import Settings
from streamscore.spec.model import FeatureSpec

ROLLOUT_DEMO_SETTINGS = dict(
    rollout_auto_shadow=True, rollout_min_labelled=1500, rollout_canary_shares="0.1,0.5",
    rollout_gate_interval_s=1.0, logger_flush_interval_s=0.5, train_num_boost_round=100,
    # v2 is trained on the history plus the first live events: allow it the usual offline noise
    gate_max_auc_drop=0.02, gate_max_rmse_increase=0.05, trainer_min_new_labels=0,
)
ROLLOUT_DEMO_HISTORY = 20_000
ROLLOUT_DEMO_CHUNK = 2_000  # live events per step while waiting for the gate
ROLLOUT_DEMO_MAX_CHUNKS = 25
WAIT_S = 90.0
wait_for = functools.partial(wait_for_at_most, timeout_s=WAIT_S)


def _worse_version(store: Store, registry: ModelRegistry, settings: Settings, spec: FeatureSpec, seed: int,
                   reason: str) -> int:
    """A version of the spec trained on the logged data with its labels shuffled: deliberately worse."""
    data = load_training_set(store, spec)
    y = np.random.default_rng(seed).permutation(data.y)
    trained = training.train_model(data.X, y, spec.feature_names, spec.categorical_features,
                                   num_boost_round=30, objective=spec.objective)
    return registry.register(settings.model_name, trained.booster, feature_set=spec.feature_set,
                             feature_names=spec.feature_names, categorical_features=spec.categorical_features,
                             train_rows=trained.train_rows, metrics=trained.metrics, baseline=trained.baseline,
                             threshold=trained.threshold, params=trained.params, reason=reason,
                             objective=spec.objective, vocabularies=data.vocabularies, spec_name=spec.name).version


def run_rollout_phases(console: Console, settings: Settings, spec: FeatureSpec, store: Store, codec: AvroCodec,
                       options, entities: int) -> dict:
    from streamscore.services.tools.demo import _produce, wait_for_rows, wait_until_accounted

    figures: dict = {}
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    headline = "rmse" if spec.objective == "regression" else "auc"
    simulator = generator_ending_now(spec, options.seed, entities,
                                     options.history_events + ROLLOUT_DEMO_CHUNK * (ROLLOUT_DEMO_MAX_CHUNKS + 2))
    produced = 0
    with ServiceGroup(settings, ["scorer", "logger", "trainer"], store=store, spec=spec) as group:
        scorer, trainer = group.services["scorer"], group.services["trainer"]

        def live(label: str, n: int = ROLLOUT_DEMO_CHUNK) -> None:
            nonlocal produced
            _produce(console, settings, spec, codec, simulator, n, options.rate, 0, label)
            produced += n

        def until(condition, what: str) -> bool:
            """Live chunks until `condition` holds (the gate needs labelled events to judge)."""
            for _ in range(ROLLOUT_DEMO_MAX_CHUNKS):
                if condition():
                    return True
                live(f"live ({what}; serving {scorer.pipeline.serving.describe()})")
                wait_for(condition, timeout_s=3.0, group=group)
            return bool(condition())

        # --- 1. history and v1 -------------------------------------------------------------------
        report = _produce(console, settings, spec, codec, simulator, options.history_events, None, 0,
                          "history (no model yet)")
        produced += options.history_events
        wait_until_accounted(store, options.history_events)
        wait_for_rows(store, "labels", report.labels)
        v1 = train_and_register(store, registry, settings, spec, reason="demo: initial model")
        publish_model_updates(settings, codec, v1.events)
        wait_for(lambda: scorer.pipeline.model.version == v1.version.version, group=group)
        console.print(f"v1 trained on {v1.training_rows} labelled events, holdout {headline.upper()} "
                      f"{v1.version.metrics.get(headline, float('nan')):.3f}: serving v1")

        # --- 2. a retrain request -> v2 in shadow --------------------------------------------------
        live("live on v1")
        wait_until_accounted(store, produced)
        day_ms = 86_400_000
        boundary = trainer.newest_event_ms() // day_ms * day_ms  # the daily schedule's latest boundary
        request = trainer.request_scheduled_retrain(boundary)
        outcome = wait_for(lambda: next((o for o in trainer.outcomes if o.request_id == request["request_id"]), None),
                        timeout_s=180.0, group=group)
        if outcome is None or outcome.action != "shadowed":
            console.print(f"[red]the retrain did not put a version in shadow[/red]: {outcome}")
            return figures
        v2 = outcome.version
        console.print(f"scheduled retrain request {request['request_id']} on the retrain topic -> v{v2} trained on "
                      f"{outcome.training_rows} labelled events, offline gate passed ({outcome.reason}): "
                      f"[bold]v{v2} in shadow[/bold]", highlight=False)
        wait_for(lambda: v2 in [m.version for m in scorer.pipeline.serving.shadows], group=group)

        # --- 3. online gate: shadow -> canary steps -> production ----------------------------------
        shadow_started = time.monotonic()
        promoted = until(lambda: registry.rollout(name).production == v2, f"online gate of v{v2}")
        figures["v2_shadow_to_production_s"] = time.monotonic() - shadow_started
        wait_for(lambda: scorer.pipeline.model.version == v2, group=group)
        console.print(f"[bold]v{v2} {'promoted' if promoted else 'NOT promoted'}[/bold] by the online gate "
                      f"(serving {scorer.pipeline.serving.describe()})", highlight=False)

        # --- 4. worse versions: v3 in shadow, v4 as the canary ---------------------------------------
        v3 = _worse_version(store, registry, settings, spec, options.seed, "demo: trained on shuffled labels")
        v4 = _worse_version(store, registry, settings, spec, options.seed + 1, "demo: trained on shuffled labels")
        events = [registry.shadow(name, v3, reason="demo: a worse candidate in shadow").event,
                  registry.canary(name, v4, 0.1, reason="demo: a worse candidate as the canary").event]
        publish_model_updates(settings, codec, events)
        wait_for(lambda: scorer.pipeline.serving.canary is not None and scorer.pipeline.serving.shadows, group=group)
        console.print(f"v{v3} (shuffled labels) in shadow, v{v4} (shuffled labels) serving 10% of entities as the "
                      "canary", highlight=False)
        worse_started = time.monotonic()
        stopped = until(lambda: not registry.rollout(name).shadows and registry.rollout(name).canary is None,
                        f"online gate of v{v3} and v{v4}")
        figures["worse_stopped_s"] = time.monotonic() - worse_started
        wait_for(lambda: scorer.pipeline.serving.canary is None and not scorer.pipeline.serving.shadows, group=group)
        wait_until_accounted(store, produced)
        time.sleep(1.0)  # the last model updates reach model_versions
        figures.update(v1=v1.version.version, v2=v2, v3=v3, v4=v4, v2_promoted=promoted, worse_stopped=stopped,
                       events=produced)

    figures["steps"] = _print_steps(console, registry, name, spec.objective)
    figures["shadow_vs_served"] = _print_shadow_comparison(console, store, spec.objective)
    figures["canary_steps"] = _print_canary_shares(console, store, registry, name, v2)
    history = registry.stages(name)["history"]
    v4_rolled_back = any(h["action"] == "rollback" and h["version"] == v4 for h in history)
    figures["worse_promoted"] = any(h["action"] == "promote" and h["version"] in (v3, v4) for h in history)
    console.print(f"v{v2}: shadow -> canary {' -> '.join(f'{s:.0%}' for s in settings.canary_shares)} -> production "
                  f"in {figures['v2_shadow_to_production_s']:.1f} s of live traffic; worse versions promoted: "
                  f"[bold]{'YES' if figures['worse_promoted'] else 'none'}[/bold] (v{v3} "
                  f"{next((h['action'] for h in reversed(history) if h['version'] == v3), '-')}ed from shadow, "
                  f"v{v4} {'rolled back' if v4_rolled_back else 'NOT rolled back'} "
                  f"from canary, {figures['worse_stopped_s']:.1f} s after they started)", highlight=False)
    return figures


def _print_steps(console: Console, registry: ModelRegistry, name: str, objective: str) -> list[dict]:
    metrics = ("rmse", "mae", "estimated_mae") if objective == "regression" else ("auc", "log_loss", "estimated_auc")
    table = Table(title="registry actions of the rollout (model_versions has the same, with evidence)",
                  title_justify="left")
    for column in ("ver", "action", "stage", "labelled", *(f"{m}/prod" for m in metrics)):
        table.add_column(column, justify="left" if column in ("action", "stage") else "right", no_wrap=True)
    steps = []
    for h in registry.stages(name)["history"]:
        evidence = h.get("evidence") or {}
        stage = h["stage"] + (f" {h['share']:.0%}" if h.get("share") else "")
        cells = [f"{evidence[m]:.3f}/{evidence[f'production_{m}']:.3f}" if m in evidence else "-" for m in metrics]
        table.add_row(f"v{h['version']}", h["action"], stage,
                      f"{int(evidence['labelled']):,}" if "labelled" in evidence else "-", *cells)
        steps.append({"version": h["version"], "action": h["action"], "stage": stage, **evidence})
    console.print(table)
    return steps


def _print_shadow_comparison(console: Console, store: Store, objective: str) -> list[dict]:
    from streamscore.ops.report import shadow_sql

    sql = shadow_sql(objective)[0]
    result = store.query(sql)
    table = Table(title="shadow against the serving version, on the same labelled events", title_justify="left")
    for column in result.column_names:  # shadow_version -> shadow v, shadow_auc -> shadow auc, ...
        table.add_column(column.replace("_version", " v").replace("_", " ", 1), justify="right")
    for row in result.rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    console.print(f"[dim]{sql}[/dim]", highlight=False)
    return [dict(zip(result.column_names, row)) for row in result.rows]


def _print_canary_shares(console: Console, store: Store, registry: ModelRegistry, name: str,
                         version: int) -> list[dict]:
    """Per canary step of `version`: the share of entities it served (from predictions, which record the
    version that served each event) against the step's setting."""
    history = [h for h in registry.stages(name)["history"] if h["version"] == version]
    table = Table(title=f"canary steps of v{version}: share of entities served (predictions.model_version)",
                  title_justify="left")
    for column in ("step", "set", "entities", f"served by v{version}", "actual share", "seconds"):
        table.add_column(column, justify="right")
    steps = []
    for step, (entry, following) in enumerate(zip(history, history[1:]), 1):
        if entry["action"] != "canary":
            continue
        entities, served = store.query(
            "SELECT uniqExact(entity_id), uniqExactIf(entity_id, model_version = {v:UInt32}) FROM predictions FINAL "
            "WHERE scored_at >= fromUnixTimestamp64Milli({a:Int64}, 'UTC') "
            "AND scored_at < fromUnixTimestamp64Milli({b:Int64}, 'UTC')",
            {"v": version, "a": entry["at"] + 1000, "b": following["at"]}).rows[0]  # (+1 s: the scorer follows)
        share = served / entities if entities else float("nan")
        seconds = (following["at"] - entry["at"]) / 1000
        table.add_row(str(len(steps) + 1), f"{entry['share']:.0%}", f"{entities:,}", f"{served:,}", f"{share:.1%}",
                      f"{seconds:.1f}")
        steps.append({"share": entry["share"], "entities": int(entities), "served": int(served),
                      "actual": share, "seconds": seconds})
    console.print(table)
    return steps
