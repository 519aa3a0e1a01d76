"""The embedded store shared with other processes over a local unix socket.

chDB allows one process per data dir and cannot open a listener itself, so the process that holds it
(`streamscore run`, the demo) serves queries on `<data_dir>/clickhouse.sock` (owner-only permissions):
`streamscore query`, `status`, `report` and the trainer's training process connect there while it runs
(`connect_store`) and open the data dir themselves when nothing serves it.

Protocol, one request then one answer per round trip, any number on one connection:
  request: 4-byte big-endian length + JSON {"op": ..., "sql": ..., "parameters": ..., "fmt": ...}
  answer:  4-byte length + JSON header {"ok": bool, "error": str, "read_rows": int, "value": ...}
           + 8-byte length + body bytes (a query's result in ClickHouse's Native format, or raw output)
A query's rows travel as Native bytes and are decoded in the asking process: the serving process (which
also scores) only runs ClickHouse, never turns a large result into Python objects.
Ops: query (rows), raw (the output of the SQL's own FORMAT, or `fmt`), command, services (what the serving
process runs: name -> running). It is read-only by design: nothing writes through it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streamscore.clickhouse.store import MIGRATIONS, QueryResult, Store, StoreError, open_store
from streamscore.settings import Settings

log = logging.getLogger("streamscore.shared_store")

_LENGTH = struct.Struct(">I")
_BODY_LENGTH = struct.Struct(">Q")
MAX_UNIX_PATH = 100  # sun_path holds 104-108 bytes depending on the OS


def socket_path(settings: Settings) -> Path:
    """Where the process holding the embedded data dir serves it: <data_dir>/clickhouse.sock, or (when that
    path is too long for a unix socket) a name in the temp dir derived from it."""
    path = (settings.data_dir / "clickhouse.sock").resolve()
    if len(str(path)) <= MAX_UNIX_PATH:
        return path
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"streamscore-{digest}.sock"


def _read_exact(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("store socket closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _send(conn: socket.socket, header: dict, body: bytes = b"") -> None:
    head = json.dumps(header, default=str).encode()
    conn.sendall(_LENGTH.pack(len(head)) + head + _BODY_LENGTH.pack(len(body)))
    if body:
        conn.sendall(body)


def _receive(conn: socket.socket) -> tuple[dict, bytes]:
    (n,) = _LENGTH.unpack(_read_exact(conn, _LENGTH.size))
    header = json.loads(_read_exact(conn, n))
    (size,) = _BODY_LENGTH.unpack(_read_exact(conn, _BODY_LENGTH.size))
    return header, _read_exact(conn, size) if size else b""


class StoreServer:
    """Serves `store` on a unix socket from a daemon thread (a thread per connection)."""

    def __init__(self, store: Store, path: Path, services: Callable[[], dict[str, bool]] | None = None):
        self.store = store
        self.path = path
        self.services = services or (lambda: {})
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._inode: int | None = None

    def start(self) -> "StoreServer":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a previous holder's socket (it died): nobody can be serving this data dir,
            self.path.unlink()  # since we hold it now
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # owner-only from the start, not chmod after a window
        try:
            server.bind(str(self.path))
        finally:
            os.umask(old_umask)
        self._inode = os.stat(self.path).st_ino
        server.listen(16)
        self._socket = server
        self._thread = threading.Thread(target=self._accept, name="store-server", daemon=True)
        self._thread.start()
        log.info("serving the embedded store on %s", self.path)
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="store-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    (n,) = _LENGTH.unpack(_read_exact(conn, _LENGTH.size))
                    request = json.loads(_read_exact(conn, n))
                except (ConnectionError, OSError, ValueError):
                    return
                try:
                    header, body = self.answer(request)
                except Exception as exc:  # noqa: BLE001 - a SQL error goes back to the asker
                    header, body = {"ok": False, "error": str(exc).strip()}, b""
                try:
                    _send(conn, header, body)
                except OSError:
                    return

    def answer(self, request: dict) -> tuple[dict, bytes]:
        op = request.get("op")
        if op == "services":
            return {"ok": True, "value": self.services()}, b""
        with self.store.using_database(request.get("database")):
            return self._answer_sql(op, request)

    def _answer_sql(self, op: str, request: dict) -> tuple[dict, bytes]:
        sql, parameters = request.get("sql", ""), request.get("parameters")
        if op == "query":
            body, read_rows = self.store.native_query(sql, parameters)
            return {"ok": True, "read_rows": read_rows}, body
        if op == "raw":
            return {"ok": True}, self.store.raw_query(sql, parameters, fmt=request.get("fmt"))
        if op == "command":
            value = self.store.command(sql, parameters)
            return {"ok": True, "value": value if isinstance(value, (str, int, float, list)) else None}, b""
        raise StoreError(f"unknown store request op {op!r}; choose from query, raw, command, services")

    def stop(self) -> None:
        self._closed.set()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        try:
            if os.stat(self.path).st_ino == self._inode:  # ours, not a later holder's
                self.path.unlink()
        except FileNotFoundError:
            pass


class RemoteStore(Store):
    """A Store whose queries the process holding the embedded data dir answers (see StoreServer).
    Read-only: inserts and migrations belong to that process."""

    def __init__(self, settings: Settings, path: Path, timeout_s: float | None = 600.0):
        super().__init__(None, settings)
        self.path = path
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout_s)
        try:
            conn.connect(str(path))
        except OSError:
            conn.close()
            raise
        self._conn = conn

    @property
    def location(self) -> str:
        return f"{self.settings.clickhouse_dsn} (served by the running process on {self.path})"

    def _ask(self, request: dict) -> tuple[dict, bytes]:
        request["database"] = self.database
        with self._lock:
            try:
                payload = json.dumps(request).encode()
                self._conn.sendall(_LENGTH.pack(len(payload)) + payload)
                header, body = _receive(self._conn)
            except (OSError, ConnectionError) as error:
                raise StoreError(f"the process serving the embedded store on {self.path} stopped answering: "
                                 f"{error}") from error
        if not header.get("ok"):
            raise StoreError(header.get("error") or "the store server refused the request")
        return header, body

    def query(self, sql: str, parameters: dict | Sequence | None = None,
              column_formats: dict[str, str] | None = None) -> QueryResult:
        header, body = self._ask({"op": "query", "sql": sql, "parameters": parameters})
        return decode_native(sql, body, column_formats, read_rows=int(header.get("read_rows", 0)))

    def raw_query(self, sql: str, parameters: dict | Sequence | None = None, fmt: str | None = None) -> bytes:
        return self._ask({"op": "raw", "sql": sql, "parameters": parameters, "fmt": fmt})[1]

    def query_formatted(self, sql: str) -> bytes:
        return self.raw_query(sql)

    def native_query(self, sql: str, parameters: dict | Sequence | None = None) -> tuple[bytes, int]:
        header, body = self._ask({"op": "query", "sql": sql, "parameters": parameters})
        return body, int(header.get("read_rows", 0))

    def command(self, sql: str, parameters: dict | Sequence | None = None) -> Any:
        return self._ask({"op": "command", "sql": sql, "parameters": parameters})[0].get("value")

    def services(self) -> dict[str, bool]:
        """name -> running, of the services of the process serving the store."""
        return dict(self._ask({"op": "services"})[0].get("value") or {})

    def migrate(self) -> list[int]:
        applied = {version for version, _ in self.applied_migrations()}
        missing = [version for version, _, _ in MIGRATIONS if version not in applied]
        if missing:
            raise StoreError(f"the store served on {self.path} lacks migrations {missing}; restart the process "
                             "holding it (it migrates at start)")
        return []

    def insert(self, table, rows, column_names, dedup_token=None) -> int:
        raise StoreError(f"the store served on {self.path} is read-only for other processes: insert into "
                         f"{table} from the process that holds it")

    def insert_native(self, table, block, rows, dedup_token=None) -> int:
        return self.insert(table, (), ())

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def decode_native(sql: str, body: bytes, column_formats: dict[str, str] | None = None,
                  read_rows: int = 0) -> QueryResult:
    """Rows of a result in ClickHouse's Native format, decoded as clickhouse-connect decodes its own."""
    from clickhouse_connect.driver._backend.chdb_backend import _BytesSource
    from clickhouse_connect.driver.ctypes import RespBuffCls
    from clickhouse_connect.driver.query import QueryContext
    from clickhouse_connect.driver.transform import NativeTransform

    if not body:
        return QueryResult(column_names=(), rows=[], read_rows=read_rows)
    context = QueryContext(query=sql, column_formats=column_formats, use_none=True)
    result = NativeTransform().parse_response(RespBuffCls(_BytesSource(body)), context)
    return QueryResult(column_names=tuple(result.column_names), rows=[tuple(row) for row in result.result_rows],
                       read_rows=read_rows)


def connect_store(settings: Settings) -> Store:
    """The store for a command or a helper process: the running process's, over its socket, while one holds
    the embedded data dir; else the data dir opened here (or the ClickHouse server of CLICKHOUSE_URL)."""
    if settings.is_embedded_store:
        path = socket_path(settings)
        if path.exists():
            try:
                return RemoteStore(settings, path)
            except OSError:
                pass  # a socket left by a process that died: the data dir is free
    return open_store(settings)

