"""Reading README.md's reference sections, and generating the parts that mirror code.

The README documents public interfaces (env vars, CLI commands, topics, tables,
schemas); tests/test_settings.py and tests/test_public_interfaces.py compare
those sections with the code. The Configuration table and the CLI list are
generated from the code, so after adding a Settings field or a command run

    .venv/bin/python -m streamscore.dev.readme_tables configuration --write   # or: cli --write

which replaces that table in README.md (without --write it prints it).
`clickhouse` prints the columns of a freshly migrated database as a starting
point for the ClickHouse tables section (keys and notes are added by hand).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]  # a dev tool: run from a checkout
README = REPO_ROOT / "README.md"
CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"  # the reference of every setting (generated table)

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`([^`]+)`")


# --- reading markdown -----------------------------------------------------------

def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def _lines_outside_fences(text: str) -> list[tuple[str, bool]]:
    """(line, inside_fence) for every line; headings and tables only count outside fences."""
    result, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            result.append((line, True))
            inside = not inside
            continue
        result.append((line, inside))
    return result


def section(text: str, title: str) -> str:
    """Body of the first heading whose text starts with `title` (case-insensitive), up to the
    next heading of the same or a higher level; raises KeyError when there is none."""
    lines = _lines_outside_fences(text)
    wanted = title.lower()
    for start, (line, fenced) in enumerate(lines):
        match = None if fenced else _HEADING.match(line)
        if match and match.group(2).strip().lower().startswith(wanted):
            level = len(match.group(1))
            body = []
            for line2, fenced2 in lines[start + 1:]:
                match2 = None if fenced2 else _HEADING.match(line2)
                if match2 and len(match2.group(1)) <= level:
                    break
                body.append(line2)
            return "\n".join(body)
    raise KeyError(f"README.md has no heading starting with {title!r}")


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2).strip())
            for line, fenced in _lines_outside_fences(text)
            if not fenced and (m := _HEADING.match(line))]


def _split_row(line: str) -> list[str]:
    cells, current = [], ""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            current += "|"
            i += 2
            continue
        if char == "|":
            cells.append(current.strip())
            current = ""
        else:
            current += char
        i += 1
    cells.append(current.strip())
    return cells


@dataclass(frozen=True)
class MarkdownTable:
    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> list[str]:
        lowered = [h.lower() for h in self.header]
        if name.lower() not in lowered:
            raise KeyError(f"table has no column {name!r}; columns: {self.header}")
        index = lowered.index(name.lower())
        return [row[index] if index < len(row) else "" for row in self.rows]

    def records(self) -> list[dict[str, str]]:
        keys = [h.lower() for h in self.header]
        return [dict(zip(keys, row + [""] * (len(keys) - len(row)))) for row in self.rows]


def tables(markdown: str) -> list[MarkdownTable]:
    """Every pipe table in `markdown` (outside code fences)."""
    found: list[MarkdownTable] = []
    lines = _lines_outside_fences(markdown)
    i = 0
    while i < len(lines) - 1:
        line, fenced = lines[i]
        separator, fenced_sep = lines[i + 1]
        if (not fenced and not fenced_sep and line.strip().startswith("|")
                and re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", separator)):
            header = _split_row(line)
            rows, j = [], i + 2
            while j < len(lines) and not lines[j][1] and lines[j][0].strip().startswith("|"):
                rows.append(_split_row(lines[j][0]))
                j += 1
            found.append(MarkdownTable(header, rows))
            i = j
        else:
            i += 1
    return found


def first_table(text: str, section_title: str) -> MarkdownTable:
    found = tables(section(text, section_title))
    if not found:
        raise KeyError(f"README.md section {section_title!r} has no markdown table")
    return found[0]


def code_spans(cell: str) -> list[str]:
    return _CODE_SPAN.findall(cell)


def first_code_span(cell: str) -> str:
    spans = code_spans(cell)
    if not spans:
        raise ValueError(f"expected a `code` name in table cell {cell!r}")
    return spans[0]


# --- what the code says -----------------------------------------------------------

def env_var(field_name: str) -> str:
    """The environment variable Settings reads for a field: its upper-case alias, else STREAMSCORE_<FIELD>."""
    from pydantic import AliasChoices

    from streamscore.settings import Settings

    field = Settings.model_fields[field_name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        names = [choice for choice in alias.choices if isinstance(choice, str)]
        upper = [name for name in names if name.isupper()]
        return (upper or names)[0]
    if isinstance(alias, str):
        return alias
    prefix = Settings.model_config.get("env_prefix", "")
    return f"{prefix}{field_name}".upper()


def settings_env_vars() -> dict[str, str]:
    """env var -> Settings field name, for every field."""
    from streamscore.settings import Settings

    return {env_var(name): name for name in Settings.model_fields}


def accepted_env_vars() -> dict[str, str]:
    """Every env var Settings reads -> field: the documented one, plus STREAMSCORE_<FIELD> for aliased
    fields (pydantic-settings reads that spelling too; the alias wins when both are set)."""
    from streamscore.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    accepted = {f"{prefix}{name}".upper(): name for name in Settings.model_fields}
    accepted.update(settings_env_vars())
    return accepted


def default_text(field_name: str) -> str:
    """How the Configuration table shows a field's default."""
    from streamscore.settings import Settings

    default = Settings.model_fields[field_name].default
    if default is None:
        return "unset"
    if default == "":
        return '`""`'
    return f"`{default}`"


def configuration_table() -> str:
    from streamscore.settings import Settings

    lines = ["| env var | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{env_var(name)}` | {default_text(name)} | {meaning} |")
    return "\n".join(lines)


def cli_commands() -> dict[str, object]:
    """'infra up' -> click command, for every leaf command of the `streamscore` CLI."""
    import typer.main

    from streamscore.services.cli import app

    root = typer.main.get_command(app)
    leaves: dict[str, object] = {}

    def walk(command, path: tuple[str, ...]) -> None:
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            for name, sub in command.commands.items():
                walk(sub, (*path, name))
        else:
            leaves[" ".join(path)] = command

    walk(root, ())
    return leaves


def _usage(command) -> str:
    parts = []
    for param in command.params:
        if param.param_type_name == "argument":
            metavar = (param.name or "").upper()
            parts.append(f"{metavar}..." if param.nargs == -1 else metavar)
    return " ".join(parts)


def cli_table() -> str:
    lines = ["| command | what it does |", "|---|---|"]
    for path, command in cli_commands().items():
        usage = _usage(command)
        invocation = f"streamscore {path}" + (f" {usage}" if usage else "")
        summary = (command.help or "").strip().split("\n")[0].replace("|", "\\|")
        lines.append(f"| `{invocation}` | {summary} |")
    return "\n".join(lines)


def clickhouse_columns_table() -> str:
    """Columns of a freshly migrated database (embedded chDB in a temp dir: run it as its own process)."""
    import tempfile

    from streamscore.settings import Settings
    from streamscore.clickhouse.store import open_store

    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(clickhouse_url=None, data_dir=Path(data_dir), clickhouse_database="readme")
        store = open_store(settings)
        store.migrate()
        engines = dict(store.query("SELECT name, engine FROM system.tables WHERE database = 'readme'").rows)
        columns: dict[str, list[str]] = {name: [] for name in engines}
        for table, name, type_ in store.query("SELECT table, name, type FROM system.columns "
                                              "WHERE database = 'readme' ORDER BY table, position").rows:
            columns[table].append(f"`{name}` {type_}")
        store.close()
    lines = ["| table | engine, key | columns |", "|---|---|---|"]
    for table in sorted(engines):
        lines.append(f"| `{table}` | {engines[table]} | {', '.join(columns[table])} |")
    return "\n".join(lines)


def documented_cli_commands(text: str) -> set[str]:
    """Command paths in the CLI section's table: the lower-case words after `streamscore` in each first cell."""
    documented = set()
    for row in first_table(text, "CLI").rows:
        invocation = first_code_span(row[0]).split()
        if not invocation or invocation[0] != "streamscore":
            raise ValueError(f"CLI table cell {row[0]!r} should start with `streamscore ...`")
        words = []
        for word in invocation[1:]:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                break
            words.append(word)
        documented.add(" ".join(words))
    return documented


def replace_first_table(text: str, section_title: str, new_table: str) -> str:
    """`text` with the first table of the section replaced by `new_table` (the rest untouched)."""
    body = section(text, section_title)
    start = text.index(body)
    lines = body.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith("|"))
    last = first
    while last < len(lines) and lines[last].lstrip().startswith("|"):
        last += 1
    before = "".join(lines[:first])
    after = "".join(lines[last:])
    return text[:start] + before + new_table + "\n" + after + text[start + len(body):]


GENERATED = {"configuration": (CONFIGURATION, "Configuration", configuration_table),
             "cli": (README, "CLI", cli_table)}


def configuration_text() -> str:
    return CONFIGURATION.read_text(encoding="utf-8")

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    write = "--write" in sys.argv[2:]
    if what in GENERATED:
        path, title, generate = GENERATED[what]
        if write:
            path.write_text(replace_first_table(path.read_text(encoding="utf-8"), title, generate()), encoding="utf-8")
            print(f"{path.relative_to(REPO_ROOT)}: {title} table regenerated")
        else:
            print(generate())
    elif what == "clickhouse":
        print(clickhouse_columns_table())
    else:
        sys.exit("usage: python -m streamscore.dev.readme_tables configuration|cli [--write] | clickhouse")
