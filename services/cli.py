"""The `streamscore` command line: one entry point for operators and the demo."""
from __future__ import annotations

import typer

from streamscore.settings import Settings

app = typer.Typer(help="streamscore: streaming inference and logging on Kafka + ClickHouse.", no_args_is_help=True)


def main() -> None:
    app()
