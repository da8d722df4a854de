"""The `ctweb` command: the seed article's verbs against a ctweb dashboard.

Exit status: 0 done; 1 the operation failed or was cancelled; 2 the dashboard or the client
refused (a wrong token, an unknown container, a 409 naming the running operation, bad
arguments); 3 the operation waits for a person's decision; 130 interrupted (the operation
goes on: `ctweb operation ID --follow` picks it up again).
"""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

from . import config
from .client import ApiError, Client, q
from .follow import display, follow, sentence

OK, FAILED, REFUSED, WAITING, INTERRUPTED = 0, 1, 2, 3, 130


class Ctx:
    def __init__(self, remote: str | None, json_mode: bool):
        self.remote_name = remote
        self.json = json_mode
        self.out = Console(highlight=False, soft_wrap=True)
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            _, url, token = config.resolve(self.remote_name)
            self._client = Client(url, token)
        return self._client

    def emit(self, data) -> None:
        click.echo(json.dumps(data, indent=1, sort_keys=True, default=str))


def _fail(message: str, code: int = REFUSED):
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Every refusal is one sentence on stderr, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ApiError, config.ConfigError) as e:
            _fail(str(e))
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(INTERRUPTED)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--remote", "-r", envvar="CTWEB_REMOTE", help="The remote to talk to (default: the current one).")
@click.option("--json", "json_mode", is_flag=True, help="Machine-readable output: JSON only, no progress.")
@click.version_option(package_name=None, version=__import__("ctwebcli").__version__, prog_name="ctweb")
@click.pass_context
def cli(ctx, remote, json_mode):
    """Checkpoint, restore and live-migrate containers on a ctweb dashboard."""
    ctx.obj = Ctx(remote, json_mode)


pass_ctx = click.pass_obj


# --- remotes ------------------------------------------------------------------------


@cli.group()
def remote():
    """Dashboards this client knows, with their API tokens."""


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--token", "token_opt", help="The API token (else read from $CTWEB_TOKEN, from stdin, or asked).")
@click.pass_obj
def remote_add(c: Ctx, name, url, token_opt):
    """Add a dashboard: checks the token there, then stores it (file mode 0600)."""
    config.check_name(name)
    url = config.check_url(url)
    token = token_opt or os.environ.get("CTWEB_TOKEN")
    if not token:
        if sys.stdin.isatty():
            token = click.prompt(f"API token for {url}", hide_input=True)
        else:
            token = sys.stdin.readline()
    token = (token or "").strip()
    if not token:
        raise config.ConfigError("No token given: create one on the dashboard's Tokens page.")
    client = Client(url, token)
    settings = client.get("/api/v1/settings/")  # every role may read it: proves the token and the URL
    if not isinstance(settings, dict) or "direct_transfer_networks" not in settings:
        raise ApiError(f"{url} answered, but not as a ctweb dashboard does.")
    config.add(name, url, token)
    if c.json:
        c.emit({"remote": name, "url": url, "current": True})
    else:
        click.echo(f"Remote {name} added ({url}); it is now the current remote.")


@remote.command("list")
@click.pass_obj
def remote_list(c: Ctx):
    """The remotes, the current one marked."""
    data = config.load()
    rows = [
        {"name": n, "url": r["url"], "current": n == data.get("current")} for n, r in sorted(data["remotes"].items())
    ]
    if c.json:
        return c.emit(rows)
    table = Table("NAME", "URL", "CURRENT")
    for r in rows:
        table.add_row(r["name"], r["url"], "yes" if r["current"] else "")
    c.out.print(table)


@remote.command("switch")
@click.argument("name")
@click.pass_obj
def remote_switch(c: Ctx, name):
    """Make NAME the current remote."""
    config.switch(name)
    click.echo(json.dumps({"current": name}) if c.json else f"The current remote is now {name}.")


@remote.command("remove")
@click.argument("name")
@click.pass_obj
def remote_remove(c: Ctx, name):
    """Forget NAME and its token."""
    config.remove(name)
    click.echo(json.dumps({"removed": name}) if c.json else f"Remote {name} removed.")


# --- reading --------------------------------------------------------------------------


@cli.command("list")
@click.option("--host", help="Only the containers on this host.")
@click.pass_obj
def list_(c: Ctx, host):
    """The containers (the columns of `lxc list`, plus the host)."""
    rows = c.client.all("/api/v1/containers/", limit=1000, host=host)
    if c.json:
        return c.emit(rows)
    table = Table("NAME", "STATE", "IPV4", "IPV6", "TYPE", "SNAPSHOTS", "HOST")
    for r in rows:
        table.add_row(
            r["name"], r["state"], r.get("ipv4") or "", r.get("ipv6") or "", r.get("type") or "",
            str(r.get("snapshots", 0)), r.get("host") or "",
        )  # fmt: skip
    c.out.print(table)


@cli.command()
@click.argument("name")
@click.pass_obj
def info(c: Ctx, name):
    """A container: state, host, snapshots and recent operations."""
    row = c.client.get(f"/api/v1/containers/{q(name)}/")
    snaps = c.client.get(f"/api/v1/containers/{q(name)}/snapshots/", limit=100)
    ops = c.client.get("/api/v1/operations/", container=name, limit=5)
    if c.json:
        return c.emit({"container": row, "snapshots": snaps, "operations": ops})
    lines = [
        f"Name: {row['name']}",
        f"Host: {row.get('host')}",
        f"State: {row['state']}{' (with saved memory state)' if row.get('has_saved_state') else ''}",
        f"IPv4: {row.get('ipv4') or '-'}",
        f"IPv6: {row.get('ipv6') or '-'}",
        f"Type: {row.get('type') or '-'}",
        f"Template: {row.get('template') or '-'}",
        f"Created: {row.get('created_at')}",
    ]
    if row.get("config_warnings"):
        lines.append(f"Config warnings: {', '.join(row['config_warnings'])}")
    if row.get("operation"):
        lines.append(f"Running operation: {row['operation']}")
    lines.append("Snapshots:" if snaps else "Snapshots: none")
    for s in snaps:
        kind = "stateful" if s.get("stateful") else "stateless"
        lines.append(f"  {s['name']} (taken at {s.get('created_at')}) ({kind})")
    lines.append("Recent operations:" if ops else "Recent operations: none")
    for o in ops:
        lines.append(f"  {o['id']} {o['kind']} {o['status']} {o.get('finished_at') or o.get('started_at') or ''}")
    click.echo("\n".join(lines))


@cli.command()
@click.pass_obj
def hosts(c: Ctx):
    """The hosts, their status and what they can do."""
    rows = c.client.get("/api/v1/hosts/")
    if c.json:
        return c.emit(rows)
    table = Table("NAME", "ADDRESS", "STATUS", "CRIU", "LXC", "CONTAINERS")
    for h in rows:
        caps = h.get("capabilities") or {}
        table.add_row(
            h["name"], f"{h['address']}:{h.get('port', 22)}", h["status"], str(caps.get("criu_version") or "-"),
            str(caps.get("lxc_version") or "-"), str(h.get("containers", 0)),
        )  # fmt: skip
    c.out.print(table)


# --- long work ------------------------------------------------------------------------

wait_option = click.option("--no-wait", is_flag=True, help="Print the operation and return at once.")


def _run(c: Ctx, accepted: dict, no_wait: bool) -> None:
    """Follow an accepted operation (202) to its end; exit with its outcome."""
    op_id = int(accepted["id"])
    if no_wait:
        if c.json:
            return c.emit(accepted)
        click.echo(f"Operation {op_id} started: {c.client.url}{accepted.get('url', '')}")
        return
    _follow(c, op_id)


def _follow(c: Ctx, op_id: int) -> None:
    _finish(c, _wait(c, op_id))


def _wait(c: Ctx, op_id: int) -> dict:
    """Follow an operation live to its end and return it."""
    show = display(c.json, c.out)
    try:
        return follow(c.client, op_id, show)
    except KeyboardInterrupt:
        show.close()
        click.echo(
            f"Interrupted: operation {op_id} goes on. `ctweb operation {op_id} --follow` follows it again, "
            f"`ctweb cancel {op_id}` stops it.",
            err=True,
        )
        sys.exit(INTERRUPTED)


def _finish(c: Ctx, op: dict) -> None:
    if c.json:
        c.emit(op)
    elif op["status"] == "success":
        click.echo(sentence(op))
    else:
        click.echo(f"Error: {sentence(op)}", err=True)
    if op["status"] == "waiting":
        sys.exit(WAITING)
    sys.exit(OK if op["status"] == "success" else FAILED)


def _confirm(what: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise config.ConfigError(f"{what}: confirm with --yes (there is no terminal to ask).")
    if not click.confirm(f"{what}?", default=False):
        raise config.ConfigError("Nothing was changed.")


@cli.command()
@click.argument("name")
@click.argument("snap", required=False)
@click.option(
    "--stateful/--stateless",
    default=False,
    help="Also save the processes' memory (CRIU), as `lxc snapshot --stateful`.",
)
@wait_option
@click.pass_obj
def snapshot(c: Ctx, name, snap, stateful, no_wait):
    """Take a snapshot of NAME (named SNAP, or snapN)."""
    body = {"stateful": stateful, **({"name": snap} if snap else {})}
    _run(c, c.client.post(f"/api/v1/containers/{q(name)}/snapshots/", body), no_wait)


@cli.command()
@click.argument("name")
@click.argument("snap")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@wait_option
@click.pass_obj
def restore(c: Ctx, name, snap, yes, no_wait):
    """Roll NAME back to snapshot SNAP (and its processes, if it is stateful)."""
    _confirm(f"Roll {name} back to {snap} (what changed since is lost)", yes)
    _run(c, c.client.post(f"/api/v1/containers/{q(name)}/snapshots/{q(snap)}/restore"), no_wait)


def _state(c: Ctx, name: str, body: dict, no_wait: bool) -> None:
    _run(c, c.client.post(f"/api/v1/containers/{q(name)}/state", body), no_wait)


@cli.command()
@click.argument("name")
@click.option("--stateful", is_flag=True, help="Save the processes' memory; the next start resumes them.")
@wait_option
@click.pass_obj
def stop(c: Ctx, name, stateful, no_wait):
    """Stop NAME (with --stateful, keep its running state for the next start)."""
    _state(c, name, {"action": "stop", "stateful": stateful}, no_wait)


@cli.command()
@click.argument("name")
@click.option("--discard-state", is_flag=True, help="Start cold, throwing away the state a stateful stop saved.")
@wait_option
@click.pass_obj
def start(c: Ctx, name, discard_state, no_wait):
    """Start NAME (resuming its saved state, if a stateful stop left one)."""
    _state(c, name, {"action": "start", **({"discard_state": True} if discard_state else {})}, no_wait)


@cli.command()
@click.argument("name")
@wait_option
@click.pass_obj
def restart(c: Ctx, name, no_wait):
    """Restart NAME."""
    _state(c, name, {"action": "restart"}, no_wait)


@cli.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@wait_option
@click.pass_obj
def delete(c: Ctx, name, yes, no_wait):
    """Delete NAME with its snapshots."""
    _confirm(f"Delete {name} and all its snapshots", yes)
    _run(c, c.client.delete(f"/api/v1/containers/{q(name)}/"), no_wait)


STRATEGIES = ("auto", "post-copy", "stop-and-copy", "pre-copy", "restart")


@cli.command()
@click.argument("name")
@click.argument("host")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True)
@wait_option
@click.pass_obj
def move(c: Ctx, name, host, strategy, no_wait):
    """Move NAME to HOST, live if it runs (`lxc move c1 remote:`; a trailing ':' is allowed)."""
    host = host[:-1] if host.endswith(":") else host
    _run(
        c, c.client.post(f"/api/v1/containers/{q(name)}/migrate", {"target_host": host, "strategy": strategy}), no_wait
    )


@cli.command("export")
@click.argument("name")
@click.argument("snap")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Where to write the archive.")
@click.pass_obj
def export_(c: Ctx, name, snap, output):
    """Export snapshot SNAP of NAME as one archive (`podman container checkpoint --export`)."""
    op = _wait(c, int(c.client.post(f"/api/v1/containers/{q(name)}/snapshots/{q(snap)}/export")["id"]))
    if op["status"] != "success":
        _finish(c, op)
    result = op.get("result") or {}
    output = output or result.get("file_name") or f"ctweb-{name}-{snap}.tar"
    n = _download(c, result["download"], output)
    if c.json:
        return c.emit({"operation": op["id"], "path": output, "bytes": n, "sha256": result.get("sha256")})
    click.echo(f"Snapshot {snap} of {name} exported to {output} ({n} bytes, sha256 {result.get('sha256')}).")


@cli.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.argument("host")
@click.argument("name")
@wait_option
@click.pass_obj
def import_(c: Ctx, archive, host, name, no_wait):
    """Import ARCHIVE (an export) on HOST as a new container NAME with its snapshot
    (`podman container restore --import`; restore the snapshot to run it)."""
    with open(archive, "rb") as f:
        r = c.client.request("POST", "/api/v1/imports", data={"name": name, "host": host}, files={"archive": f})
    _run(c, r.json(), no_wait)


def _download(c: Ctx, path: str, output: str) -> int:
    r = c.client.request("GET", path, stream=True)
    tmp = f"{output}.part"
    n = 0
    with open(tmp, "wb") as f:
        for chunk in r.iter_content(1 << 16):
            f.write(chunk)
            n += len(chunk)
    os.replace(tmp, output)
    return n


# --- operations -----------------------------------------------------------------------


@cli.command()
@click.argument("op_id", type=int)
@click.option("--follow", "-f", "follow_", is_flag=True, help="Follow it live to its end.")
@click.pass_obj
def operation(c: Ctx, op_id, follow_):
    """Show operation OP_ID (with --follow, wait for its end)."""
    op = c.client.operation(op_id)
    if follow_ and op["status"] not in ("success", "failure", "cancelled"):
        return _follow(c, op_id)
    if c.json:
        return c.emit(op)
    click.echo(sentence(op))
    for e in (op.get("events") or [])[-10:]:
        click.echo(f"  {e.get('at', '')} {e.get('phase', '')}: {e.get('message', '')}")


@cli.command()
@click.argument("op_id", type=int)
@click.pass_obj
def cancel(c: Ctx, op_id):
    """Cancel operation OP_ID where that is safe."""
    op = c.client.post(f"/api/v1/operations/{op_id}/cancel")
    if c.json:
        return c.emit(op)
    click.echo(f"Cancel asked for operation {op_id}: it stops at the next safe point.")


@cli.command()
@click.argument("op_id", type=int)
@click.argument("action")
@click.pass_obj
def decide(c: Ctx, op_id, action):
    """Take one of the actions a waiting operation offers (admins)."""
    op = c.client.post(f"/api/v1/operations/{op_id}/decide", {"action": action})
    if c.json:
        return c.emit(op)
    click.echo(f"Decision {action} taken for operation {op_id} (status now {op.get('status')}).")


@cli.command()
@click.argument("op_id", type=int)
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Where to write it.")
@click.pass_obj
def bundle(c: Ctx, op_id, output):
    """Download operation OP_ID's debug bundle (tar.gz)."""
    output = output or f"ctweb-operation-{op_id}-bundle.tar.gz"
    n = _download(c, f"/api/v1/operations/{op_id}/bundle", output)
    if c.json:
        return c.emit({"operation": op_id, "path": output, "bytes": n})
    click.echo(f"Debug bundle of operation {op_id} written to {output} ({n} bytes).")


def main() -> None:
    cli(prog_name="ctweb")
