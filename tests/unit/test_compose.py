"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine needed).

A deployment only talks to streamscore through the CLI and environment
variables, so those are what we check: every streamscore container runs a
command the CLI has, sets only variables Settings reads, with values Settings
accepts, pointing at services the file defines, and starts only after Kafka
and ClickHouse are healthy. Extra services (Prometheus, Grafana, ...) are fine.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import TypeAdapter
from typer.testing import CliRunner

from streamscore.dev.readme_tables import REPO_ROOT, accepted_env_vars, cli_commands
from streamscore.services.cli import app
from streamscore.services.runner import SERVICE_NAMES
from streamscore.settings import Settings

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
# Variables that address another compose service: env var -> the service kind it must point at.
ADDRESS_VARS = {"KAFKA_BOOTSTRAP_SERVERS": "kafka", "CLICKHOUSE_URL": "clickhouse",
                "SCHEMA_REGISTRY_URL": "schema-registry"}


def load_compose() -> dict:
    with COMPOSE_FILE.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)  # safe_load resolves the x-streamscore anchor and `<<` merges


COMPOSE = load_compose()
SERVICES: dict[str, dict] = COMPOSE["services"]


def is_streamscore(service: dict) -> bool:
    build = service.get("build")
    context = build.get("context") if isinstance(build, dict) else build
    image = str(service.get("image", ""))
    return context in (".", "./") or image.split(":")[0].rsplit("/", 1)[-1] == "streamscore"


STREAMSCORE_SERVICES = sorted(name for name, service in SERVICES.items() if is_streamscore(service))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the ["KEY=value", ...] form
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command(service: dict) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        pytest.fail("a streamscore container needs an explicit command (the image's default is --help)")
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def depends_on(service: dict) -> dict[str, str]:
    """dependency -> condition (the short list form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def healthy_before_start(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """Services guaranteed healthy before `name` starts: healthy deps, and theirs, transitively."""
    result: set[str] = set()
    for dep, condition in depends_on(SERVICES[name]).items():
        if dep in seen:
            continue
        if condition == "service_healthy":
            result.add(dep)
        # A started/completed dependency itself only started after its own healthy deps.
        result |= healthy_before_start(dep, seen | {name})
    return result


def service_for_address(variable: str, value: str) -> str:
    first = value.split(",")[0]
    host = urlsplit(first if "://" in first else f"//{first}").hostname
    assert host in SERVICES, f"{variable}={value!r} points at host {host!r}, which is not a service in docker-compose.yml"
    return host


def clean_env(monkeypatch) -> None:
    """No streamscore variable from the developer's shell may leak into a test."""
    for key in list(os.environ):
        if key.startswith("STREAMSCORE_") or key in accepted_env_vars():
            monkeypatch.delenv(key)


# --- the tests ---------------------------------------------------------------------

def test_compose_file_defines_the_streamscore_services():
    assert {"kafka", "clickhouse"} <= set(SERVICES), "docker-compose.yml must define kafka and clickhouse"
    long_running = {command(SERVICES[name])[1] for name in STREAMSCORE_SERVICES
                    if command(SERVICES[name])[:1] == ["run"] and len(command(SERVICES[name])) > 1}
    assert long_running == set(SERVICE_NAMES), (
        f"docker-compose.yml runs {sorted(long_running)}, the CLI has services {list(SERVICE_NAMES)}")


@pytest.mark.parametrize("name", STREAMSCORE_SERVICES)
def test_command_is_a_cli_command(name):
    args = command(SERVICES[name])
    commands = cli_commands()
    path = next((p for p in sorted(commands, key=len, reverse=True) if args[:len(p.split())] == p.split()), None)
    assert path is not None, f"service {name}: `streamscore {' '.join(args)}` is not a command; have {sorted(commands)}"
    # The arguments parse (types, options); for `run`, the names are real services.
    leaf = commands[path]
    rest = args[len(path.split()):]
    leaf.make_context(path, list(rest), resilient_parsing=False)
    if path == "run":
        unknown = [s for s in rest if s not in (*SERVICE_NAMES, "all")]
        assert not unknown, f"service {name}: unknown service(s) {unknown}; have {SERVICE_NAMES}"


@pytest.mark.parametrize("name", STREAMSCORE_SERVICES)
def test_command_starts_with_the_container_environment(name, monkeypatch):
    """The CLI's settings callback accepts the container's env and the command exists (`--help` exits 0)."""
    clean_env(monkeypatch)
    result = CliRunner().invoke(app, [*command(SERVICES[name]), "--help"], env=environment(SERVICES[name]))
    assert result.exit_code == 0, f"service {name}: exit {result.exit_code}\n{result.output}"


@pytest.mark.parametrize("name", [n for n in STREAMSCORE_SERVICES if command(SERVICES[n])[:1] == ["run"]])
def test_run_service_modules_exist(name):
    """`streamscore run X` imports streamscore.services.X.service; the image must contain it."""
    import importlib.util

    for service in command(SERVICES[name])[1:]:
        for module in ([f"streamscore.services.{s}.service" for s in SERVICE_NAMES] if service == "all"
                       else [f"streamscore.services.{service}.service"]):
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # the parent package is missing too
                found = False
            assert found, f"service {name}: {module} does not exist"


def test_one_drift_service():
    """The drift service reads every partition itself (no group balancing): replicas would double-count."""
    drift = [n for n in STREAMSCORE_SERVICES if "drift" in command(SERVICES[n])[1:] or "all" in command(SERVICES[n])[1:]]
    replicas = sum(int((SERVICES[n].get("deploy") or {}).get("replicas", 1)) for n in drift
                   if command(SERVICES[n])[:1] == ["run"])
    assert replicas == 1, f"{replicas} drift service instances in docker-compose.yml ({drift})"


@pytest.mark.parametrize("name", STREAMSCORE_SERVICES)
def test_environment_variables_are_settings(name, monkeypatch):
    env = environment(SERVICES[name])
    known = accepted_env_vars()
    unknown = sorted(set(env) - set(known))
    assert not unknown, (f"service {name} sets {unknown}, which Settings does not read "
                         "(typo, or a field to add to shared/streamscore/settings.py)")
    clean_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # a ValidationError here names the bad variable's field
    for key, value in env.items():
        field = known[key]
        expected = TypeAdapter(Settings.model_fields[field].annotation).validate_python(value)
        assert getattr(settings, field) == expected, f"service {name}: {key}={value!r} did not reach Settings.{field}"


@pytest.mark.parametrize("name", STREAMSCORE_SERVICES)
def test_metrics_address_is_explicit_where_metrics_are_served(name):
    """Metrics listen on 127.0.0.1 unless configured: a container that Prometheus (another container)
    scrapes must say which address it listens on, and it must be one reachable from outside."""
    env = environment(SERVICES[name])
    if int(env.get("STREAMSCORE_METRICS_PORT", "0") or 0) == 0:
        return
    assert "STREAMSCORE_METRICS_HOST" in env, (f"service {name} serves metrics but leaves STREAMSCORE_METRICS_HOST "
                                               "to its default, 127.0.0.1: Prometheus could not scrape it")
    assert env["STREAMSCORE_METRICS_HOST"] in ("0.0.0.0", "::"), env["STREAMSCORE_METRICS_HOST"]


@pytest.mark.parametrize("name", STREAMSCORE_SERVICES)
def test_addresses_point_at_compose_services(name):
    env = environment(SERVICES[name])
    assert "KAFKA_BOOTSTRAP_SERVERS" in env, f"service {name} would start a local broker inside the container"
    assert "CLICKHOUSE_URL" in env, (f"service {name} would use embedded chDB: one process per data dir, "
                                     "so containers could not share it")
    for variable, kind in ADDRESS_VARS.items():
        if variable in env:
            host = service_for_address(variable, env[variable])
            assert kind in host, f"service {name}: {variable} points at {host!r}, expected the {kind} service"


@pytest.mark.parametrize("name", STREAMSCORE_SERVICES)
def test_services_wait_for_healthy_dependencies(name):
    env = environment(SERVICES[name])
    # The schema registry too: encoders register their schema on the first message they write.
    needed = {service_for_address(v, env[v]) for v in ADDRESS_VARS if v in env}
    missing = needed - healthy_before_start(name)
    assert not missing, (f"service {name} may start before {sorted(missing)} is healthy: "
                         "depends_on with condition service_healthy (directly or via init)")
    for dependency in needed:
        assert "healthcheck" in SERVICES[dependency], f"{dependency} needs a healthcheck for service_healthy"


def test_long_running_services_start_after_init_migrated():
    """Topics and tables come from `streamscore infra up` run once; the services must not race it."""
    init = [n for n in STREAMSCORE_SERVICES if command(SERVICES[n])[:2] == ["infra", "up"]]
    assert len(init) == 1, f"expected one container running `infra up`, found {init}"
    for name in STREAMSCORE_SERVICES:
        if name in init:
            continue
        assert depends_on(SERVICES[name]).get(init[0]) == "service_completed_successfully", (
            f"service {name} must depend on {init[0]} with condition service_completed_successfully")


def test_services_share_the_model_registry():
    """Trainer writes versions, scorers read them: STREAMSCORE_MODEL_DIR must be the same mounted volume."""
    users = [n for n in STREAMSCORE_SERVICES if command(SERVICES[n])[:1] == ["run"]]
    model_dirs = {environment(SERVICES[n]).get("STREAMSCORE_MODEL_DIR") for n in users}
    assert len(model_dirs) == 1 and None not in model_dirs, f"STREAMSCORE_MODEL_DIR differs or is unset: {model_dirs}"
    model_dir = model_dirs.pop()
    for name in users:
        mounts = {str(v).split(":")[1] if isinstance(v, str) else v.get("target")
                  for v in SERVICES[name].get("volumes", [])}
        assert model_dir in mounts, f"service {name} does not mount a volume at {model_dir}"


def test_kafka_runs_with_the_local_brokers_jvm_flags():
    """The benchmarked broker's collector and heap (kafka_broker.py says why) are the deployment's too."""
    from streamscore.dev.kafka_broker import JVM_HEAP_FLAGS, JVM_PERFORMANCE_FLAGS

    kafka = environment(SERVICES["kafka"])
    assert kafka.get("KAFKA_HEAP_OPTS", "").split() == list(JVM_HEAP_FLAGS)
    assert kafka.get("KAFKA_JVM_PERFORMANCE_OPTS", "").split() == list(JVM_PERFORMANCE_FLAGS)


def test_dockerfile_installs_every_package_dir():
    """The image must contain what pyproject installs (shared/, services/, schemas/, README for metadata)."""
    import tomllib

    text = DOCKERFILE.read_text(encoding="utf-8")
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    copied = set()
    for line in text.splitlines():
        if line.strip().upper().startswith("COPY"):
            copied |= {Path(part).as_posix().rstrip("/") for part in line.split()[1:-1] if not part.startswith("--")}
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    readme = pyproject["project"].get("readme")
    needed = package_dirs | {"pyproject.toml"} | ({readme} if readme else set())
    missing = [path for path in sorted(needed)
               if not any(path == c or path.startswith(c + "/") for c in copied)]
    assert not missing, f"Dockerfile does not COPY {missing}"
    if readme:
        assert (REPO_ROOT / readme).exists(), f"pyproject's readme {readme} is missing: the image build would fail"
    # LightGBM's wheel links against OpenMP's libgomp, which python:*-slim images lack.
    if re.search(r"^FROM\s+python:[^\s]*slim", text, re.MULTILINE):
        assert "libgomp1" in text, "slim base image: install libgomp1 or `import lightgbm` fails in the container"
