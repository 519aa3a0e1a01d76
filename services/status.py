"""`streamscore status`: consumer groups and lag, models, recent drift and retrains, as terminal tables."""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from streamscore.ops.status import OpsStatus, collect_status
from streamscore.services.runner import SERVICE_NAMES
from streamscore.settings import Settings
from streamscore.clickhouse.store import QueryResult, Store


def show_status(settings: Settings, console: Console, store: Store | None = None) -> OpsStatus:
    status = collect_status(settings, SERVICE_NAMES, store=store)
    console.print(f"[bold]streamscore status[/bold]: Kafka {settings.bootstrap_servers}, topics '{settings.topic_prefix}*', "
                  f"database {settings.clickhouse_database}, registry {settings.registry_dir}", highlight=False)
    _print_groups(console, status)
    _print_registry(console, status)
    if status.store_error:
        console.print(f"[yellow]ClickHouse not read:[/yellow] {status.store_error}", highlight=False)
    else:
        _print_query(console, "recent drift detections", status.drift_events, "none recorded")
        _print_query(console, "recent model registry events", status.model_events, "none recorded")
    return status


def _print_groups(console: Console, status: OpsStatus) -> None:
    if status.kafka_error:
        console.print(f"[red]{status.kafka_error}[/red]", highlight=False)
        return
    services = Table("service", "consumer group", "state", "members", "lag", title="services",
                     title_justify="left", box=box.SIMPLE_HEAD)
    for group in status.groups:
        running = status.service_running(group)
        alive = ("[green]alive[/green]" if running else "[red]not running[/red]" if running is False
                 else "[yellow]unknown[/yellow] (assigns its partitions itself: see its lag)")
        if running and not group.alive:
            alive += " in the process serving the store"
        services.add_row(group.service, group.group, f"{alive} ({group.state.lower()})",
                         ", ".join(group.members) or "-",
                         f"{group.total_lag:,}" if group.partitions else "no offsets")
    console.print(services)
    lag = Table("consumer group", "topic", "partition", "committed", "end", "lag", title="consumer lag per partition",
                title_justify="left", box=box.SIMPLE_HEAD)
    for group in status.groups:
        for p in group.partitions:
            lag.add_row(group.group, p.topic, str(p.partition), "-" if p.committed is None else str(p.committed),
                        str(p.end), f"[bold red]{p.lag}[/bold red]" if p.lag else "0")
    if lag.row_count:
        console.print(lag)


def _print_registry(console: Console, status: OpsStatus) -> None:
    if status.registry_error:
        console.print(f"[red]{status.registry_error}[/red]", highlight=False)
        return
    r = status.registry
    auc = "" if r.production_auc is None else f" (validation AUC {r.production_auc:.3f})"
    console.print(f"model [bold]{r.model_name}[/bold]: production "
                  f"{'v' + str(r.production) if r.production else 'none'}{auc}, candidate "
                  f"{'v' + str(r.candidate) if r.candidate else 'none'}, {r.versions} version(s) registered",
                  highlight=False)
    if r.canary is not None or r.shadows:
        canary = f"canary v{r.canary} serving {r.canary_share:.0%} of entities" if r.canary is not None else "no canary"
        shadows = ", ".join(f"v{v}" for v in r.shadows) or "none"
        console.print(f"rollout: {canary}; in shadow: {shadows}", highlight=False)


def _print_query(console: Console, title: str, result: QueryResult | None, empty: str) -> None:
    if result is None or not result.rows:
        console.print(f"{title}: {empty}")
        return
    table = Table(*result.column_names, title=title, title_justify="left", box=box.SIMPLE_HEAD)
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in result.rows]
    for i, column in enumerate(table.columns[:-1]):  # the free-text last column wraps, the others never
        column.min_width = max(len(column.header), *(len(row[i]) for row in cells))
    for row in cells:
        table.add_row(*row)
    console.print(table)
