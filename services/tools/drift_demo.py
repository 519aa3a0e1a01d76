"""`streamscore demo --drift`: the closed loop — drift detected, retrain requested, v2 trained, gated, served.

Runs after the demo's infra step, in the same namespace, with scorer, logger,
drift and trainer as threads of this process:

1. history at full speed, v1 trained from ClickHouse and promoted;
2. live events at the offered rate; from live event `drift_at` on, the
   simulator's DriftSpec changes the stream ('concept': fraud turns into card
   testing, which v1 scores as legitimate; 'covariate': amounts x3);
3. the drift service detects it and emits one retrain request; the trainer
   trains v2 on the recent window, gates it against v1 and promotes or rejects it;
4. more live events, scored by whatever is in production now;
5. report: detection delay (events, seconds), the request, the trainer's
   verdict, and v1 vs v2 AUC / log loss on post-drift labelled events by SQL.

Sizes: 200 entities make ~2000 events per simulated day, so 16k history
events fill the 7-day feature windows (younger streams drift on their own as
entity histories grow) and a 2000-event drift window is about one day.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from streamscore.avro.codec import AvroCodec
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retraining import train_and_register
from streamscore.ops.report import metric_columns
from streamscore.services.runner import ServiceGroup
from streamscore.dev.generators import Drift, generator_ending_now
from streamscore.settings import Settings
from streamscore.spec.model import FeatureSpec
from streamscore.clickhouse.store import Store

# Drift knobs for a ~30k-event demo: the service's detectors and thresholds (docs/drift.md), with
# windows sized for the demo and a cool-down longer than it (one drift, one request).
DRIFT_DEMO_SETTINGS = dict(
    drift_window=2000, drift_min_events=2000, drift_perf_window=2000,
    drift_cooldown_events=100_000, drift_checkpoint_interval_s=1.0,
    logger_flush_interval_s=0.5, train_num_boost_round=100,
    # Retrain on ~2.5 simulated days (features still replay the whole history) once 2500 post-detection
    # labels are in: the candidate learns the new regime and the gate's holdout is mostly post-drift.
    trainer_window_days=2.5, trainer_min_new_labels=2500,
    # ...or after 20 s: labels arrive ~1 s (3,000 events) after their event, so a detection late in the live
    # phase may leave fewer than 2500 to come (the default 300 s wait outlasts the test)
    trainer_max_wait_s=20.0,
)
DRIFT_DEMO_ENTITIES = 200
DRIFT_DEMO_HISTORY = 16_000
DRIFT_DEMO_LIVE = 10_000
DRIFT_DEMO_AFTER_SWAP = 4_000
WAIT_S = 60.0


def wait_for(condition, timeout_s: float = WAIT_S, group: ServiceGroup | None = None):
    """`condition()` once truthy (or its last value after `timeout_s`, or once a service of `group` failed)."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()) and time.monotonic() < deadline:
        if group is not None and group.failures:
            break
        time.sleep(0.1)
    return result


def run_drift_phases(console: Console, settings: Settings, spec: FeatureSpec, store: Store, codec: AvroCodec, options,
                     entities: int) -> dict:
    from streamscore.services.tools.demo import _produce, count_rows, wait_for_rows, wait_until_accounted

    figures: dict = {}
    registry = ModelRegistry(settings.registry_dir)
    history, live, after = options.history_events, options.live_events, DRIFT_DEMO_AFTER_SWAP
    drift_at = min(options.drift_at, live - 1)
    simulator = generator_ending_now(spec, options.seed, entities, history + live + after,
                                     drift=Drift(options.drift_kind, at_event=history + drift_at))
    with ServiceGroup(settings, ["scorer", "logger", "drift", "trainer"], store=store, spec=spec) as group:
        scorer, drift, trainer = (group.services[n] for n in ("scorer", "drift", "trainer"))
        # --- history and v1 ---------------------------------------------------------------
        report = _produce(console, settings, spec, codec, simulator, history, None, 0, "history (no model yet)")
        wait_until_accounted(store, history)
        wait_for_rows(store, "labels", report.labels)
        v1 = train_and_register(store, registry, settings, spec, reason="demo: initial model")
        publish_model_updates(settings, codec, v1.events)
        wait_for(lambda: scorer.pipeline.model.version == v1.version.version and drift.tracker.model_version == 1)
        headline = "rmse" if spec.objective == "regression" else "auc"
        console.print(f"v1 trained on {v1.training_rows} labelled events, holdout {headline.upper()} "
                      f"{v1.version.metrics.get(headline, float('nan')):.3f}, "
                      f"{'promoted' if v1.promoted else 'rejected'}; scorer and drift monitor follow v1")

        # --- live, with the drift injected at live event drift_at -------------------------------
        live_started = time.time()
        report = _produce(console, settings, spec, codec, simulator, live, options.rate, 0,
                          f"live at {options.rate:,.0f}/s, {options.drift_kind} drift from event {drift_at:,}")
        injected_at = live_started + drift_at / options.rate  # produce_simulation paces on this schedule
        outcome = wait_for(lambda: next(iter(trainer.outcomes), None), group=group)
        if outcome is None:
            monitor = drift.tracker.monitor
            console.print(f"no retrain within {WAIT_S:.0f} s of the live phase: "
                          f"{monitor.predictions_seen if monitor else 0} predictions and "
                          f"{monitor.labels_seen if monitor else 0} labels monitored")
            if monitor is not None and not drift.requests_sent:
                # signal vs action: a shift that does not harm the model is recorded, not retrained for
                console.print(f"{options.drift_kind} drift recorded in drift_events without a retrain request (no "
                              f"evidence of harm); {monitor.evidence()}. Try --drift-kind with a harmful drift "
                              "(payments: concept; rides: traffic).")
                figures.update(drift_kind=options.drift_kind, retrain_requests=0, evidence=monitor.evidence())
            return figures
        detected_wall, request = drift.requests_sent[0]
        first_drifted = f"{simulator.id_prefix}{history + drift_at:010d}"  # the simulator numbers its events
        if outcome.action == "promoted":
            wait_for(lambda: scorer.pipeline.model.version == outcome.version)
        # --- after the retrain ------------------------------------------------------------------
        report_after = _produce(console, settings, spec, codec, simulator, after, options.rate, 0,
                                f"live after the retrain (serving v{scorer.pipeline.model.version})")
        wait_until_accounted(store, history + live + after)
        wait_for_rows(store, "labels", history + live + after)
        requests_total = len(drift.requests_sent)

    drifted_since = simulator_drift_time(store, first_drifted)
    delay_events = int(store.query(
        "SELECT count() FROM predictions FINAL WHERE model_version = 1 AND event_time >= "
        "fromUnixTimestamp64Milli({since:Int64}, 'UTC') AND event_time <= fromUnixTimestamp64Milli({at:Int64}, 'UTC')",
        {"since": drifted_since, "at": request["detected_at"]}).rows[0][0])
    figures.update(
        objective=spec.objective, drift_kind=options.drift_kind, detector=request["detector"], drift_reason=request["reason"],
        request_id=request["request_id"], detection_delay_events=delay_events,
        detection_delay_s=detected_wall - injected_at, retrain_action=outcome.action,
        retrain_reason=outcome.reason, retrain_seconds=outcome.seconds, retrain_rows=outcome.training_rows,
        retrain_version=outcome.version, request_to_served_s=(outcome.handled_at - detected_wall),
        after_swap_events=report_after.events, retrain_requests=requests_total,
    )
    figures["rows"] = {t: count_rows(store, t) for t in ("predictions", "labels", "drift_events", "model_versions")}
    _print_drift_summary(console, store, figures, drifted_since)
    return figures


def simulator_drift_time(store: Store, first_drifted_event_id: str | None) -> int:
    """Event time (ms) of the first drifted event, as logged."""
    return int(store.query("SELECT toUnixTimestamp64Milli(any(event_time)) FROM predictions FINAL "
                           "WHERE event_id = {id:String}", {"id": first_drifted_event_id or ""}).rows[0][0])


def _print_drift_summary(console: Console, store: Store, figures: dict, drifted_since: int) -> None:
    from streamscore.services.tools.demo import _sql_table

    table = Table(title=f"streamscore demo --drift ({figures['drift_kind']})", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("drift detected by", figures["drift_reason"])
    table.add_row("  delay after the injection (events scored by v1)", f"{figures['detection_delay_events']:,}")
    table.add_row("  delay after the injection (wall seconds)", f"{figures['detection_delay_s']:.1f} s")
    table.add_row("retrain request", figures["request_id"])
    table.add_row("  retrain requests in the whole run", f"{figures['retrain_requests']}")
    table.add_row(f"v{figures['retrain_version']} {figures['retrain_action']}", figures["retrain_reason"])
    table.add_row("  training time / rows", f"{figures['retrain_seconds']:.1f} s / {figures['retrain_rows']:,}")
    table.add_row("  request -> trainer verdict", f"{figures['request_to_served_s']:.1f} s")
    for name, n in figures["rows"].items():
        table.add_row(f"rows in {name}", f"{n:,}")
    console.print(table)
    _sql_table(console, store, "post-drift labelled events, by the model version that scored them",
               f"SELECT p.model_version, {metric_columns(figures['objective'])} "
               "FROM predictions AS p FINAL INNER JOIN labels AS l FINAL ON p.event_id = l.event_id "
               f"WHERE p.model_version > 0 AND p.score IS NOT NULL AND "
               f"p.event_time >= fromUnixTimestamp64Milli({drifted_since}, 'UTC') "
               "GROUP BY p.model_version ORDER BY p.model_version")
    _sql_table(console, store, "drift_events (kind = 'drift')",
               "SELECT model_version, detector, feature, statistic, round(value, 4) AS value, "
               "round(threshold, 6) AS threshold, window, retrain_requested FROM drift_events "
               "WHERE kind = 'drift' ORDER BY detected_at, retrain_requested DESC LIMIT 8")
