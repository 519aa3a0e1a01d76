"""One typed settings object, read from environment variables.

Every service and CLI command receives a `Settings` instance; nothing reads
os.environ elsewhere. The env var for a field is STREAMSCORE_<FIELD> unless an
alias is given (the three well-known external ones keep their usual names).
README's configuration table lists them all; tests/test_settings.py checks that.
"""
from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Logical topic names; the physical name is `topic_prefix + name` (tests use a
# unique prefix per test so they never see each other's messages).
TOPIC_EVENTS = "events"
TOPIC_LABELS = "labels"
TOPIC_PREDICTIONS = "predictions"
TOPIC_SHADOW_PREDICTIONS = "shadow-predictions"
TOPIC_DEAD_LETTER = "events-dlq"
TOPIC_RETRAIN = "retrain"
TOPIC_MODEL_UPDATES = "model-updates"
TOPIC_SCORER_STATE = "scorer-state"
TOPIC_DRIFT_STATE = "drift-state"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMSCORE_", extra="ignore", populate_by_name=True, frozen=True
    )

    # --- infrastructure -----------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
        description="Use this Kafka cluster; when unset, the local broker started by `streamscore infra up`.",
    )
    kafka_port: int = Field(default=19092, ge=1, le=65534, description="Port of the local broker (controller uses port+1).")
    kafka_version: str = Field(default="4.4.0", description="Apache Kafka version the local broker installs from Maven Central.")
    clickhouse_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CLICKHOUSE_URL", "clickhouse_url"),
        description="http(s)://user:pass@host:port of a ClickHouse server; when unset, embedded chDB in data_dir.",
    )
    clickhouse_database: str = Field(default="streamscore", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="ClickHouse database holding the tables.")
    schema_registry_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "schema_registry_url"),
        description="Confluent schema registry; when unset, Avro single-object encoding with schemas from schemas/.",
    )
    # --- connecting to secured infrastructure (docs/connectivity.md) ------------------
    kafka_client_properties: Path | None = Field(
        default=None,
        description="librdkafka properties file (the `client.properties` convention: key=value lines, # comments) "
        "applied to every Kafka client; a Java `sasl.jaas.config` line is read for its username and password. "
        "The STREAMSCORE_KAFKA_* security settings below win over it; its bootstrap.servers is used when "
        "KAFKA_BOOTSTRAP_SERVERS is unset.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = Field(
        default=None, description="Kafka security.protocol; unset: the properties file's, else PLAINTEXT.")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="Kafka SASL mechanism (with a SASL_* security protocol).")
    kafka_sasl_username: str | None = Field(default=None, description="Kafka SASL username.")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="Kafka SASL password (never printed: status, logs and errors show ***).")
    kafka_ssl_ca_location: Path | None = Field(
        default=None, description="PEM file of the CA(s) that signed the brokers' certificates; unset: the "
        "system's trust store.")
    kafka_ssl_certificate_location: Path | None = Field(
        default=None, description="Client certificate (PEM) for mutual TLS; needs STREAMSCORE_KAFKA_SSL_KEY_LOCATION.")
    kafka_ssl_key_location: Path | None = Field(default=None, description="Private key (PEM) of the client certificate.")
    kafka_ssl_key_password: SecretStr | None = Field(default=None, description="Password of the private key, if it has one.")
    schema_registry_username: str | None = Field(default=None, description="Schema registry basic-auth user (or API key).")
    schema_registry_password: SecretStr | None = Field(default=None, description="Schema registry basic-auth password (or API secret).")
    schema_registry_ca_location: Path | None = Field(default=None, description="PEM CA file the schema registry's TLS certificate is checked against.")
    schema_registry_certificate_location: Path | None = Field(default=None, description="Client certificate (PEM) for a schema registry that asks for mutual TLS.")
    schema_registry_key_location: Path | None = Field(default=None, description="Private key (PEM) of that client certificate.")
    clickhouse_ca_cert: Path | None = Field(default=None, description="PEM CA file the ClickHouse server's TLS certificate (https CLICKHOUSE_URL) is checked against.")
    clickhouse_verify: bool = Field(default=True, description="Check the ClickHouse server's TLS certificate and host name (false only for a test server).")

    cache_dir: Path = Field(default=Path(".cache"), description="Downloaded artifacts (Kafka jars). Safe to delete.")
    data_dir: Path = Field(default=Path(".data"), description="Broker logs, embedded ClickHouse, model registry.")
    topic_prefix: str = Field(default="", description="Prefix of every topic name (isolates tests and tenants).")
    partitions: int = Field(default=4, ge=1, description="Partitions of the events/labels/predictions topics.")
    consumer_group_prefix: str = Field(default="streamscore", description="Consumer groups are <prefix>-<service>.")

    # --- feature spec and model ------------------------------------------------
    spec: Path | None = Field(
        default=None,
        description="The feature spec (a spec.yaml, or a directory holding one): the team's event schema, "
        "features, checks and label. Unset: the payments example (examples/payments).")
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$",
                                   description="Name of the served model in the registry; unset: the spec's model.name.")
    model_dir: Path | None = Field(default=None, description="Model registry directory; default <data_dir>/models.")

    # --- scorer -------------------------------------------------------------
    scorer_batch_size: int = Field(default=500, ge=1, description="Max events the scorer takes per batch.")
    scorer_batch_wait_ms: int = Field(
        default=0, ge=0,
        description="Max wait to fill a scorer batch once its first event is in (0: take what has arrived; "
        "batches still grow with the rate).")
    scorer_checkpoint_interval_ms: int = Field(
        default=5_000, ge=0,
        description="The scorer writes changed entity state, waits for acks and commits offsets at most this often "
        "while events flow (0 = after every batch), and at once when none came for 0.1 s (an idle scorer's lag is "
        "0 within about 0.1 s); a crash replays at most this much (predictions are at-least-once either way).")

    scorer_static_membership: bool = Field(
        default=True,
        description="The scorer joins its consumer group with a group.instance.id kept across restarts (host, "
        "data dir, first free slot: kafka/membership.py): restarted after a crash it gets its partitions back at "
        "once instead of after the session timeout; stopped for good, its partitions move after the session "
        "timeout.")

    scorer_own_process: bool = Field(
        default=True,
        description="`streamscore run all` and the demo run the scorer in a child process of its own "
        "(services/service_process.py), so the other services and the demo's producer never hold its GIL; false: "
        "a thread beside them, as the tests that look inside a running scorer do.")
    bulk_work_nice: int = Field(
        default=10, ge=0, le=19,
        description="With the scorer in a process of its own: the nice value every other thread of the process "
        "that runs it takes (logger, drift, trainer, the embedded ClickHouse's inserts and merges; "
        "ops/cpu_priority.py), so on a shared host the scorer and the broker get the cores first; 0: off.")

    # --- logger -------------------------------------------------------------
    logger_batch_rows: int = Field(default=20_000, ge=1, description="Logger flushes to ClickHouse at this many rows...")
    logger_flush_interval_s: float = Field(default=1.0, gt=0, description="...or after this many seconds, whichever first (a quarter of it once the topics went quiet: a burst's tail is written at once).")

    # --- drift (streamscore.drift.monitor; thresholds are measured in services/tools/drift_quality.py, docs/drift.md) ---
    drift_detectors: str = Field(
        default="windowed,performance,estimated",
        description="Comma list of drift detector families: windowed (PSI / mean shift / NaN / unknown-category rate "
        "per tumbling window vs the training baseline, and the importance-weighted PSI), performance (AUC, log loss "
        "or MAE from delayed labels vs the holdout's), estimated (performance estimated without labels from the "
        "calibrated scores), adwin and pagehinkley (per event on the score; off by default: see docs/drift.md). "
        "Every detection is recorded in drift_events; only performance, estimated and the weighted PSI can "
        "request a retrain.",
    )
    drift_features: str = Field(
        default="",
        description="Comma list of features the windowed detector monitors; empty = every feature in the model's "
        "baseline except hour_of_day (diurnal by design), plus score.",
    )
    drift_event_features: str = Field(
        default="",
        description="Comma list of features that ALSO get per-event ADWIN/PageHinkley (the score always does); "
        "'all' = every monitored feature. Costs ~1 us/update per feature and adds false alarms on bursty features.",
    )
    drift_window: int = Field(default=2000, ge=100, description="Events per tumbling window for windowed statistics (PSI, mean shift).")
    drift_psi_threshold: float = Field(default=0.25, gt=0, description="Window PSI vs the baseline's bins above this is drift (0.25 = 'significant shift').")
    drift_mean_shift_threshold: float = Field(default=0.5, gt=0, description="|window mean - baseline mean| in baseline std units above this is drift.")
    drift_nan_fraction_threshold: float = Field(default=0.1, gt=0, le=1, description="Window NaN fraction above baseline NaN fraction by more than this is drift.")
    drift_unknown_rate_threshold: float = Field(default=0.05, gt=0, le=1, description="Window share of code 1 (never-seen category) in *_code features above baseline by more than this is drift.")
    drift_adwin_delta: float = Field(default=1e-6, gt=0, lt=1, description="ADWIN confidence (smaller = fewer false alarms, slower detection).")
    drift_ph_delta: float = Field(default=0.01, gt=0, description="PageHinkley tolerated change, in baseline-quantile (0..1) units.")
    drift_ph_threshold: float = Field(default=100.0, gt=0, description="PageHinkley alarm threshold (cumulative deviation).")
    drift_min_events: int = Field(default=2000, ge=0, description="No drift alarm before this many predictions of a model version (warm-up).")
    drift_cooldown_events: int = Field(default=50_000, ge=0, description="After a retrain request, no new one until this many predictions...")
    drift_cooldown_s: float = Field(default=600.0, ge=0, description="...AND this much event time have passed (one shift -> one retrain).")
    drift_perf_window: int = Field(default=5000, ge=100, description="Labelled predictions in the rolling AUC / log loss / MAE window (checked once half of them have arrived).")
    drift_logloss_ratio_threshold: float = Field(default=1.5, gt=1, description="The lower confidence bound (mean - 3 standard errors) of the rolling log loss / the reference (the holdout log loss, or the loss the calibrated scores expect if higher) above this is evidence of harm.")
    drift_auc_drop_threshold: float = Field(default=0.1, gt=0, lt=1, description="Holdout AUC - rolling AUC above this, and above 3 standard errors, is evidence of harm.")
    drift_min_positives: int = Field(default=30, ge=1, description="Measured AUC only from label windows with at least this many positives and as many negatives (a 1.4% fraud rate gives ~70 in 5,000 labels).")
    drift_mae_ratio_threshold: float = Field(default=1.15, gt=1, description="Regression: the lower confidence bound of the rolling MAE / the holdout MAE above this is evidence of harm.")
    drift_estimated_auc_drop_threshold: float = Field(default=0.05, gt=0, lt=1, description="Holdout estimated AUC - window estimated AUC (from calibrated scores, no labels) above this (and above the worst healthy holdout chunk) is evidence of harm; the online gate rejects a candidate estimated this much below production before labels arrive.")
    drift_estimated_mae_ratio_threshold: float = Field(default=1.2, gt=1, description="Regression: window estimated MAE (the holdout's loss model, no labels) / holdout estimate above this is evidence of harm; the online gate rejects a candidate whose estimated MAE is this many times production's.")
    drift_estimated_logloss_ratio_threshold: float = Field(default=3.0, gt=1, description="Binary: the window's expected log loss (calibrated scores standing in for the labels, no labels needed) / the holdout's above this (and above 1.5x the worst healthy holdout chunk's ratio) is evidence of harm.")
    drift_estimate_every: int = Field(default=1000, ge=1, description="The estimated channel (no labels) is evaluated every this many predictions over the last drift_window scores (sliding; the window statistics stay tumbling): persistence costs fewer events.")
    drift_weighted_psi_threshold: float = Field(default=0.5, gt=0, description="Importance-weighted PSI (sum of gain share x PSI over features) above this (and above 2x the healthy holdout chunks' maximum) is evidence of harm.")
    drift_persist_windows: int = Field(default=2, ge=1, description="Label-free evidence must hold for this many consecutive evaluations (weighted PSI: windows; estimated: its sliding evaluations, every drift_estimate_every): a short burst does not retrain.")
    drift_clear_windows: int = Field(default=3, ge=1, description="Cool-down breakthrough: once the evidence a request cited stays below half its threshold for this many evaluations (measured evidence: at least a whole label window of checks), the cool-down ends.")
    drift_checkpoint_interval_s: float = Field(default=5.0, gt=0, description="Drift service: save the monitor state (drift-state topic), write drift_events and commit offsets at most this often (at once after a retrain request).")
    drift_label_join_size: int = Field(default=200_000, ge=1, description="Drift service: recent predictions (event_id -> score) kept in memory to join labels; labels of older ones are joined through ClickHouse.")
    drift_label_wait_s: float = Field(default=60.0, ge=0, description="Drift service: a label whose prediction is not found yet is retried for this long, then counted as unmatched.")

    # --- trainer (streamscore.learning.training) -------------------------------------------
    train_num_boost_round: int = Field(default=200, ge=1, description="LightGBM boosting rounds per training run.")
    train_validation_fraction: float = Field(default=0.2, gt=0, lt=1, description="Most recent share of the training set held out for metrics, threshold and the gate.")
    train_alert_rate: float | None = Field(default=None, gt=0, lt=1, description="Serving threshold flags this top share of the holdout; unset = threshold maximising F1.")
    gate_min_auc: float = Field(default=0.70, ge=0, le=1, description="Promotion gate: a candidate needs at least this AUC (offline on the holdout, online on the labelled live events).")
    gate_max_auc_drop: float = Field(default=0.01, ge=0, le=1, description="Promotion gate: candidate AUC may be at most this much below production's on the same events (the holdout offline, the labelled live events online).")
    gate_max_rmse_increase: float = Field(default=0.02, ge=0, description="Promotion gate of a regression: candidate RMSE may be at most this share above production's on the same events (the holdout offline, the labelled live events online).")
    trainer_window_days: float = Field(default=30.0, gt=0, description="Trainer service: train on labelled events of the last N days, counted back from the newest logged event.")
    trainer_max_events: int = Field(default=200_000, ge=1_000, description="Trainer service: ...and at most the newest N logged events (plus the history their features need before them), so a retrain's time stays flat however long the table grows.")
    trainer_max_history_events: int = Field(default=200_000, ge=0, description="Trainer service: events replayed before the window to warm entity state up: the spec's history (lateness + longest window), but at most this many (the window's first events may then see a shorter history).")
    trainer_shutdown_grace_s: float = Field(default=20.0, ge=0, description="Trainer service: at a stop, a training in flight gets this long to finish (then it is registered, published and recorded like any other); past it, it is abandoned unregistered and its request handled at the next start. Keep it below the shutdown deadline (30 s).")
    trainer_min_new_labels: int = Field(default=1000, ge=0, description="Trainer service: before retraining, wait until this many labelled events newer than the drift detection are logged (the candidate must see the new regime, and the gate's recent holdout must contain it)...")
    trainer_max_wait_s: float = Field(default=300.0, ge=0, description="...but train anyway after waiting this long for them.")
    retrain_every_hours: float = Field(
        default=0.0, ge=0,
        description="Trainer service: scheduled retraining, a retrain request on the retrain topic every N hours of "
        "event time (at multiples of N hours since the epoch, counted from the newest logged event; 24 = daily; "
        "0 = off). Handled like a drift request (dedup, gate, then shadow).")

    # --- staged rollouts (streamscore.learning.rollout; run by the trainer service) ------------------
    rollout_auto_shadow: bool = Field(
        default=False,
        description="A trainer candidate that passes the offline gate goes into shadow (scored on every event, "
        "not served) for the online gate, instead of straight to production.")
    rollout_min_labelled: int = Field(
        default=1000, ge=1,
        description="Online gate: labelled events scored by both production and the candidate (shadow or canary) "
        "needed before a verdict; the same tolerances as the offline gate (STREAMSCORE_GATE_*).")
    rollout_canary_shares: str = Field(
        default="0.05,0.25",
        description="Online gate: the canary shares a shadow version that passed goes through, step by step, each "
        "gated again on its own labelled events before the next (comma list, increasing, each in (0, 1)); after "
        "the last it is promoted. Empty: promote straight from shadow.")
    rollout_gate_interval_s: float = Field(default=10.0, gt=0,
                                           description="Trainer service: run the online gate at most this often.")

    log_level: str = Field(default="INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: str = Field(default="text", pattern=r"^(text|json)$",
                            description="Log lines as 'text' (key=value fields appended) or 'json' (one object per line).")

    # --- operations ---------------------------------------------------------------
    metrics_port: int = Field(default=0, ge=0, le=65535,
                              description="Serve Prometheus metrics of the services run by this process on this port (0 = off).")
    metrics_host: str = Field(default="127.0.0.1", min_length=1,
                              description="Address the metrics endpoint listens on (127.0.0.1: this machine only; "
                              "0.0.0.0 in a container that Prometheus scrapes).")
    service_max_restarts: int = Field(default=5, ge=0,
                                      description="`run`: a crashed service is restarted with backoff; after this "
                                      "many crashes in a row (none running for service_healthy_s) the process exits 1.")
    service_restart_backoff_s: float = Field(default=1.0, gt=0, description="First restart delay; doubles per crash in a row up to 60 s.")
    service_healthy_s: float = Field(default=60.0, gt=0, description="A service that ran this long before crashing starts its restart count again.")
    metrics_lag_interval_s: float = Field(default=10.0, gt=0, description="How often the consumer lag gauges are refreshed from Kafka.")

    # --- validation -----------------------------------------------------------
    @field_validator("kafka_client_properties", "kafka_ssl_ca_location", "kafka_ssl_certificate_location",
                     "kafka_ssl_key_location", "schema_registry_ca_location", "schema_registry_certificate_location",
                     "schema_registry_key_location", "clickhouse_ca_cert")
    @classmethod
    def _file_exists(cls, path: Path | None, info) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"STREAMSCORE_{info.field_name.upper()}={path}: no such file")
        return path

    @model_validator(mode="after")
    def _consistent_security(self) -> "Settings":
        from streamscore.kafka.properties import read_client_properties

        if self.kafka_client_properties is not None:
            read_client_properties(self.kafka_client_properties)  # a bad file fails here, naming its line
        protocol = self.kafka_security_protocol
        if protocol is not None and protocol.startswith("SASL") and self.kafka_sasl_mechanism is None:
            raise ValueError(f"STREAMSCORE_KAFKA_SECURITY_PROTOCOL={protocol} needs STREAMSCORE_KAFKA_SASL_MECHANISM "
                             "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
        if (self.kafka_sasl_username is None) != (self.kafka_sasl_password is None):
            raise ValueError("STREAMSCORE_KAFKA_SASL_USERNAME and STREAMSCORE_KAFKA_SASL_PASSWORD are set together")
        if (self.kafka_ssl_certificate_location is None) != (self.kafka_ssl_key_location is None):
            raise ValueError("STREAMSCORE_KAFKA_SSL_CERTIFICATE_LOCATION and STREAMSCORE_KAFKA_SSL_KEY_LOCATION are "
                             "set together (mutual TLS needs both)")
        if (self.schema_registry_username is None) != (self.schema_registry_password is None):
            raise ValueError("STREAMSCORE_SCHEMA_REGISTRY_USERNAME and STREAMSCORE_SCHEMA_REGISTRY_PASSWORD are set "
                             "together")
        if (self.schema_registry_certificate_location is None) != (self.schema_registry_key_location is None):
            raise ValueError("STREAMSCORE_SCHEMA_REGISTRY_CERTIFICATE_LOCATION and "
                             "STREAMSCORE_SCHEMA_REGISTRY_KEY_LOCATION are set together")
        return self

    @field_validator("rollout_canary_shares")
    @classmethod
    def _check_canary_shares(cls, value: str) -> str:
        parse_shares(value)
        return value

    # --- derived ------------------------------------------------------------
    @property
    def canary_shares(self) -> tuple[float, ...]:
        return parse_shares(self.rollout_canary_shares)

    @property
    def client_properties(self) -> dict[str, str]:
        """The properties file's entries ({} without one)."""
        from streamscore.kafka.properties import read_client_properties

        if self.kafka_client_properties is None:
            return {}
        return read_client_properties(self.kafka_client_properties)

    @property
    def bootstrap_servers(self) -> str:
        return (self.kafka_bootstrap_servers or self.client_properties.get("bootstrap.servers")
                or f"127.0.0.1:{self.kafka_port}")

    @property
    def uses_local_broker(self) -> bool:
        return not self.kafka_bootstrap_servers and "bootstrap.servers" not in self.client_properties

    @property
    def clickhouse_location(self) -> str:
        """CLICKHOUSE_URL without its password, for messages."""
        from urllib.parse import urlsplit, urlunsplit

        if not self.clickhouse_url:
            return self.clickhouse_dsn
        parts = urlsplit(self.clickhouse_url)
        if parts.password is None:
            return self.clickhouse_url
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def clickhouse_dsn(self) -> str:
        if self.clickhouse_url:
            return self.clickhouse_url
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def is_embedded_store(self) -> bool:
        return not self.clickhouse_url

    @property
    def registry_dir(self) -> Path:
        return self.model_dir or self.data_dir / "models"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, service: str) -> str:
        return f"{self.consumer_group_prefix}-{service}"


def parse_shares(text: str) -> tuple[float, ...]:
    """STREAMSCORE_ROLLOUT_CANARY_SHARES as numbers; ValueError naming the setting and the bad value."""
    shares = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            share = float(part)
        except ValueError:
            raise ValueError(f"STREAMSCORE_ROLLOUT_CANARY_SHARES: {part!r} is not a number") from None
        if not 0 < share < 1:
            raise ValueError(f"STREAMSCORE_ROLLOUT_CANARY_SHARES: share {part} is not between 0 and 1 (exclusive)")
        if shares and share <= shares[-1]:
            raise ValueError(f"STREAMSCORE_ROLLOUT_CANARY_SHARES: shares must increase, {part} follows {shares[-1]:g}")
        shares.append(share)
    return tuple(shares)
