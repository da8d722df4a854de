"""Following an operation to its end: live over its websocket, by polling when that fails.

What the user sees depends on where stdout goes: a progress bar (phase, message, bytes) on a
terminal; plain lines, one per phase, on stderr otherwise; nothing but the final JSON with
--json. The operation row is the truth: every few seconds without a message, and at the end,
the HTTP API is asked again, so a lost websocket message never leaves the client waiting.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime

from .client import Client

FINAL = ("success", "failure", "cancelled")
QUIET_S = 5.0  # ask the API when the websocket has been silent this long


def _mib(n) -> str:
    return f"{(n or 0) / 1048576:.1f} MiB"


def sentence(op: dict) -> str:
    """One line saying how an operation ended, with its figures where it has them."""
    kind, status = op.get("kind"), op.get("status")
    name = op.get("container") or op.get("host") or f"operation {op.get('id')}"
    result = op.get("result") or {}
    if status == "failure":
        error = op.get("error") or "no reason was recorded"
        why = result.get("explanation") if isinstance(result.get("explanation"), dict) else None
        if why and why.get("sentence") and why.get("fix"):  # what CRIU's lines mean, first
            where = f" on {why['host']}" if why.get("host") else ""
            return f"{kind} of {name} failed{where}: {why['sentence']} Fix: {why['fix']}\n{error}"
        return f"{kind} of {name} failed: {error}"
    if status == "cancelled":
        return f"{kind} of {name} was cancelled{': ' + op['error'] if op.get('error') else ''}."
    if status == "waiting":
        waiting = result.get("waiting") or {}
        return f"{kind} of {name} is waiting: {waiting.get('sentence') or 'a host does not answer'}"
    if status != "success":
        return f"{kind} of {name} is {status} ({op.get('phase') or 'starting'}, {op.get('progress') or 0}%)."
    if kind == "migrate":
        parts = [f"strategy {result.get('strategy')}"]
        if result.get("downtime_ms") is not None:
            parts.append(f"downtime {float(result['downtime_ms']):.0f} ms")
        if isinstance(result.get("client_downtime_ms"), int | float):
            parts.append(f"{float(result['client_downtime_ms']):.0f} ms as its clients saw it")
        if result.get("total_ms") is not None:
            parts.append(f"{float(result['total_ms']) / 1000:.1f} s in all")
        if result.get("bytes_transferred") is not None:
            parts.append(f"{_mib(result['bytes_transferred'])} transferred")
        return f"Moved {name} to {op.get('target_host')}: {', '.join(parts)}."
    took = ""
    if op.get("started_at") and op.get("finished_at"):
        try:
            secs = (
                datetime.fromisoformat(op["finished_at"]) - datetime.fromisoformat(op["started_at"])
            ).total_seconds()
            took = f" in {secs:.1f} s"
        except ValueError:
            pass
    return f"{kind} of {name} done{took}."


class _Plain:
    """Not a terminal: a line per phase on stderr (no bar, no colour)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.phase = None
        self.waiting_shown = False
        self.decision_shown = False

    def update(self, op: dict, event: dict | None) -> None:
        phase = (event or {}).get("phase") or op.get("phase")
        if not self.quiet and phase and phase != self.phase and phase not in FINAL:
            self.phase = phase
            message = (event or {}).get("message") or ""
            print(f"operation {op.get('id')}: {phase}{': ' + message if message else ''}", file=sys.stderr, flush=True)
        self.show_waiting(op)
        self.show_decision(op)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def show_waiting(self, op: dict) -> None:
        """Once per wait: what it waits for."""
        if op.get("status") != "waiting":
            self.waiting_shown = False
            return
        if not self.quiet and not self.waiting_shown:
            self.waiting_shown = True
            self.say(sentence(op))

    def show_decision(self, op: dict) -> None:
        decision = (op.get("result") or {}).get("decision")
        if self.quiet or self.decision_shown or op.get("status") != "waiting" or not decision:
            return
        self.decision_shown = True
        lines = [f"operation {op.get('id')} needs a decision: {decision.get('sentence')}"]
        for a in decision.get("actions") or []:
            lines.append(f"  ctweb decide {op.get('id')} {a.get('id')}   # {a.get('label')}: {a.get('consequence')}")
        self.say("\n".join(lines))

    def close(self) -> None:
        pass


class _Bar(_Plain):
    """A terminal: a rich progress bar with the phase, its message and the bytes moved."""

    def __init__(self, console):
        super().__init__(quiet=False)
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.fields[phase]:<9}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[bytes]:>12}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[message]}"),
            console=console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("", total=100, phase="pending", bytes="", message="")

    def update(self, op: dict, event: dict | None) -> None:
        event = event or {}
        fields = {"phase": event.get("phase") or op.get("phase") or op.get("status") or ""}
        if event.get("message"):
            fields["message"] = str(event["message"])[:60]
        if event.get("bytes"):
            fields["bytes"] = _mib(event["bytes"])
        self.progress.update(self.task, completed=op.get("progress") or 0, **fields)
        self.show_waiting(op)
        self.show_decision(op)

    def say(self, text: str) -> None:
        self.progress.console.print(text, markup=False)

    def close(self) -> None:
        self.progress.stop()


def display(json_mode: bool, console):
    if json_mode:
        return _Plain(quiet=True)
    if console.is_terminal:
        return _Bar(console)
    return _Plain(quiet=False)


def _via_websocket(client: Client, op_id: int, show) -> dict | None:
    """Follow over the websocket; the final operation, or None when the socket failed."""
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    try:
        ws = connect(
            client.ws_url(f"/ws/operations/{int(op_id)}/"),
            additional_headers={"Authorization": f"Token {client.token}"},
            open_timeout=10,
            close_timeout=2,
        )
    except (OSError, WebSocketException, TimeoutError):
        return None
    with ws:
        while True:
            try:
                raw = ws.recv(timeout=QUIET_S)
            except TimeoutError:
                op = client.operation(op_id)  # quiet for a while: the row is the truth
                show.update(op, None)
                if op["status"] in FINAL:
                    return op
                continue
            except (OSError, WebSocketException):
                return None
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            op = msg.get("operation")
            if not isinstance(op, dict):
                continue
            events = msg.get("events") if msg.get("type") == "state" else [msg.get("event")]
            for event in [e for e in events or [] if isinstance(e, dict)] or [None]:
                show.update(op, event)
            if op.get("status") in FINAL:
                return client.operation(op_id)  # the full row: result, error, events


def _via_polling(client: Client, op_id: int, show, interval: float = 1.0) -> dict:
    seen = 0
    while True:
        op = client.operation(op_id)
        events = op.get("events") or []
        for event in events[seen:]:
            show.update(op, event)
        seen = len(events)
        show.update(op, None)
        if op["status"] in FINAL:
            return op
        time.sleep(interval)


def follow(client: Client, op_id: int, show) -> dict:
    """Wait for the operation's end, showing its progress; returns the final operation."""
    try:
        return _via_websocket(client, op_id, show) or _via_polling(client, op_id, show)
    finally:
        show.close()
