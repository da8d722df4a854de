"""Fleet scale on PostgreSQL: the list pages and their API equivalents with 200 hosts,
10,000 containers, 200,000 snapshots and 100,000 operations in the database.

A private PostgreSQL (scripts/postgres.sh, 127.0.0.1:55433, not CI's 55432) is migrated and
filled with bulk_create; then each endpoint is requested in this process with Django's test
client: server time (URL routing, middleware, auth, SQL, serialising or rendering), no network.
Pages use a viewer's session, the API a viewer's token. Each endpoint gets 2 warm-up requests,
then `repeat` timed ones, then two with their SQL queries counted. The same endpoints are measured
at 1/20 of the rows first, so the query counts can be compared: they must not grow with rows.

Runs in its own process because the database is chosen before Django starts:
    .venv/bin/python bench/fleet.py [--repeat 30] [--json OUT]   (bench/run.py --only fleet runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PORT = int(os.environ.get("CTWEB_BENCH_PG_PORT", 55433))
FULL = {"hosts": 200, "containers": 10_000, "snapshots": 200_000, "operations": 100_000}
SMALL_DIVISOR = 20
WARMUP = 2
TARGET_P95_MS = 100

ROLES = ["web", "db", "cache", "worker", "ci", "api", "mail", "build"]
STATES = ["RUNNING"] * 14 + ["STOPPED"] * 4 + ["FROZEN", "UNKNOWN"]
KINDS = (
    ["snapshot"] * 30
    + ["start"] * 12
    + ["stop"] * 12
    + ["restart"] * 6
    + ["create"] * 8
    + ["delete"] * 4
    + ["restore"] * 8
    + ["delete-snapshot"] * 6
    + ["migrate"] * 8
    + ["probe"] * 3
    + ["sync"] * 3
)
ENDED = ["success"] * 90 + ["failure"] * 8 + ["cancelled"] * 2
PHASES = {
    "snapshot": ["connect", "dump", "copy", "save"],
    "restore": ["connect", "stop", "restore"],
    "migrate": ["preflight", "dump", "transfer", "restore", "cleanup"],
    "create": ["connect", "create", "start"],
}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# --- the data ------------------------------------------------------------------------------


def criu_dump_stats(rnd: random.Random) -> dict:
    pages = rnd.randint(2_000, 140_000)
    return {
        "freezing_time": rnd.randint(200, 3_000),
        "frozen_time": rnd.randint(20_000, 900_000),
        "memdump_time": rnd.randint(5_000, 400_000),
        "memwrite_time": rnd.randint(5_000, 500_000),
        "pages_scanned": pages + rnd.randint(0, 5_000),
        "pages_skipped_parent": 0,
        "pages_written": pages,
        "irmap_resolve": 0,
        "pages_lazy": 0,
        "page_pipes": rnd.randint(1, 30),
        "page_pipe_bufs": rnd.randint(1, 60),
        "shpages_scanned": 0,
        "shpages_skipped_parent": 0,
        "shpages_written": 0,
        "total_ms": rnd.randint(150, 4_000),
        "frozen_ms": rnd.randint(40, 1_500),
    }


def snapshot_contents(rnd: random.Random, stats: dict) -> dict:
    procs = [
        {"pid": 1, "ppid": 0, "comm": "init", "command": "/sbin/init", "mapped_bytes": 9 << 20, "vmas": 40},
        {"pid": 57, "ppid": 1, "comm": "sh", "command": "sh -c i=0; while true; do ...", "mapped_bytes": 2 << 20},
    ]
    procs += [
        {
            "pid": 100 + i,
            "ppid": 1,
            "comm": "python3",
            "command": "python3 -c ...",
            "mapped_bytes": rnd.randint(1, 600) << 20,
        }
        for i in range(rnd.randint(0, 3))
    ]
    images = [
        {"name": n, "size": rnd.randint(100, 20_000)} for n in ("core-1.img", "mm-1.img", "pstree.img", "files.img")
    ]
    images.append({"name": "pages-1.img", "size": stats["pages_written"] * 4096})
    return {
        "processes": procs,
        "sockets": [{"type": "UNIX", "ino": rnd.randint(10_000, 99_999), "state": "LISTEN"}],
        "mounts": [{"mountpoint": "/", "fstype": "ext4", "source": "rootfs", "root": "/", "options": "rw"}],
        "stats": stats,
        "images": images,
        "images_bytes": sum(i["size"] for i in images),
        "errors": [],
    }


def events_for(rnd, kind, status, start, n_phases) -> list[dict]:
    phases = PHASES.get(kind, ["connect", kind])[:n_phases]
    out, at = [], start
    for i, phase in enumerate(phases):
        for j in range(rnd.randint(1, 3)):
            at += timedelta(milliseconds=rnd.randint(5, 800))
            progress = int(100 * (i + (j + 1) / 4) / len(phases))
            out.append(
                {
                    "at": at.isoformat(),
                    "phase": phase,
                    "message": f"{phase}: step {j + 1}",
                    "seq": len(out),
                    "progress": progress,
                }
            )
    if status in ("success", "failure", "cancelled"):
        out.append({"at": at.isoformat(), "phase": status, "message": status, "seq": len(out)})
    return out


def result_for(rnd, kind, status, source, target) -> tuple[dict, str]:
    if status == "failure":
        err = (
            "lxc-checkpoint failed (exit status 1): Error (criu/cr-dump.c:1788): Dumping FAILED.\n"
            "(00.021732) Error (criu/sk-inet.c:199): inet: Connected TCP socket, consider using --tcp-established"
        )
        return {"bundle": [source]}, err
    if status != "success":
        return {}, ""
    if kind == "migrate":
        strategy = rnd.choice(["stop-and-copy", "post-copy", "pre-copy"])
        stats = criu_dump_stats(rnd)
        return {
            "strategy": strategy,
            "why": None,
            "source": source,
            "target": target,
            "downtime_ms": round(rnd.uniform(300, 9_000), 1),
            "total_ms": round(rnd.uniform(1_500, 30_000), 1),
            "bytes_transferred": stats["pages_written"] * 4096 + rnd.randint(1 << 20, 40 << 20),
            "phases": {"preflight_ms": 120.5, "presync_ms": 800.0, "transfer_ms": 950.2, "restore_ms": 410.7},
            "dump_stats": stats,
            "restore_stats": {"restore_time": rnd.randint(50_000, 600_000), "total_ms": rnd.randint(100, 900)},
            "transport": "relayed through the dashboard over both hosts' SSH connections (encrypted)",
        }, ""
    if kind == "snapshot":
        return {
            "name": "x",
            "snapshot": "snap",
            "stats": criu_dump_stats(rnd),
            "size_bytes": rnd.randint(1 << 20, 1 << 30),
        }, ""
    if kind in ("start", "stop", "restart", "restore", "create"):
        return {"name": "x", "state": "RUNNING" if kind != "stop" else "STOPPED", "has_saved_state": False}, ""
    if kind == "sync":
        return {"added": [], "changed": [f"web-{rnd.randint(0, 9999):05d}"], "missing": []}, ""
    return {}, ""


def generate(scale: dict, seed: int = 7) -> dict:
    """Fill the (empty) fleet tables; returns how many rows of each were made."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.utils import timezone

    from containers.models import Container, Snapshot
    from hosts.models import Host
    from operations.models import Operation

    rnd = random.Random(seed)
    now = timezone.now()
    users = list(get_user_model().objects.filter(username__in=["alice", "bob", "erin", "frank"]))
    batch = 5_000

    hosts = Host.objects.bulk_create(
        [
            Host(
                name=f"host-{i:03d}",
                address=f"10.{i // 250}.{i % 250}.1",
                status="offline" if i % 50 == 7 else "online",
                key_type="ssh-ed25519",
                key_data="AAAAC3NzaC1lZDI1NTE5AAAAIGbXYqIV8bzRLxNfJ6vHR5cP2xvQ6QFqD7PbSqPXW0Mg",
                fingerprint=f"SHA256:{i:043d}",
                capabilities={
                    "kernel": "6.1.0-18-amd64",
                    "arch": "x86_64",
                    "criu_version": "3.17.1",
                    "criu_check": "Looks good.",
                    "lxc_version": "5.0.2",
                    "dirty_tracking": True,
                    "uffd": True,
                    "network": {"bridge": "lxcbr0", "subnet": f"10.{100 + i // 250}.{i % 250}.0/24"},
                },
                last_probe_at=now,
            )
            for i in range(scale["hosts"])
        ]
    )
    # Containers over hosts unevenly: a few big hosts, many small ones.
    weights = [1 + 8 * (i % 10 == 0) + 2 * (i % 3 == 0) for i in range(len(hosts))]
    containers = []
    for i in range(scale["containers"]):
        containers.append(
            Container(
                name=f"{ROLES[i % len(ROLES)]}-{i:05d}",
                host=rnd.choices(hosts, weights)[0],
                state=rnd.choice(STATES),
                template=rnd.choice(["busybox", "debian", "debian", "alpine"]),
                command=["sh", "-c", "exec sleep infinity"] if i % 3 else None,
                ipv4=f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}",
                has_saved_state=i % 37 == 0,
                created_at=now - timedelta(days=rnd.uniform(0, 400)),
            )
        )
    containers = Container.objects.bulk_create(containers, batch_size=batch)

    # Snapshots over containers unevenly (CI containers keep many), names unique per container.
    c_weights = [12 if c.name.startswith("ci-") else 1 + (i % 5) for i, c in enumerate(containers)]
    per_container: dict[int, int] = {}
    snaps = []
    for pick in rnd.choices(range(len(containers)), c_weights, k=scale["snapshots"]):
        c = containers[pick]
        n = per_container.get(pick, 0)
        per_container[pick] = n + 1
        stateful = rnd.random() < 0.6
        stats = criu_dump_stats(rnd) if stateful else {"total_ms": rnd.randint(50, 900)}
        snaps.append(
            Snapshot(
                container=c,
                name=f"before-upgrade-{n}" if rnd.random() < 0.05 else f"snap{n}",
                stateful=stateful,
                created_at=now - timedelta(days=rnd.uniform(0, 365)),
                created_by=rnd.choice(users + [None]),
                size_bytes=rnd.randint(1 << 20, 2 << 30),
                stats=stats,
                contents=snapshot_contents(rnd, stats) if stateful else {},
            )
        )
        if len(snaps) >= batch:
            Snapshot.objects.bulk_create(snaps)
            snaps = []
    Snapshot.objects.bulk_create(snaps)

    # Operations of every kind and state; a few hundred still running or queued (one per container),
    # some for containers deleted since (container unset, name kept), a few evacuations with children.
    n_ops = scale["operations"]
    n_evac = max(1, n_ops // 1000)
    evacs = Operation.objects.bulk_create(
        [_operation(rnd, "evacuate", None, hosts, rnd.choice(hosts), users, now, "success") for _ in range(n_evac)]
    )
    active_left = max(2, n_ops // 500)
    busy: set[int] = set()
    ops = []
    for i in range(n_ops - n_evac):
        kind = rnd.choice(KINDS)
        c = None if kind in ("probe", "sync") else containers[rnd.randrange(len(containers))]
        status = rnd.choice(ENDED)
        if active_left and (c is None or c.pk not in busy) and rnd.random() < 0.01:
            status, active_left = rnd.choice(["pending", "running"]), active_left - 1
            if c is not None:
                busy.add(c.pk)
        op = _operation(rnd, kind, c, hosts, c.host if c else rnd.choice(hosts), users, now, status)
        if kind == "migrate" and i % 10 == 0:
            op.parent = rnd.choice(evacs)
        if kind in ("delete", "create") and c is not None and i % 4 == 0:
            op.container, op.container_name = None, f"gone-{i:06d}"  # history of a container deleted since
        ops.append(op)
        if len(ops) >= batch:
            Operation.objects.bulk_create(ops)
            ops = []
    Operation.objects.bulk_create(ops)
    with connection.cursor() as cur:
        cur.execute("VACUUM ANALYZE")  # what autovacuum does to a database that grew over time
    return {
        "hosts": Host.objects.count(),
        "containers": Container.objects.count(),
        "snapshots": Snapshot.objects.count(),
        "operations": Operation.objects.count(),
    }


def _operation(rnd, kind, c, hosts, host, users, now, status):
    from operations.models import Operation

    created = now - timedelta(days=rnd.uniform(0, 365), seconds=rnd.uniform(0, 86_400))
    target = rnd.choice([h for h in hosts if h.pk != host.pk] or hosts) if kind == "migrate" else None
    started = created + timedelta(milliseconds=rnd.randint(5, 3_000)) if status != "pending" else None
    ended = status in Operation.TERMINAL
    n_phases = len(PHASES.get(kind, [0, 0])) if ended else rnd.randint(1, 2)
    result, error = result_for(rnd, kind, status, host.name, target.name if target else None)
    events = events_for(rnd, kind, status, started or created, n_phases) if started else []
    params = {"snapshot": f"snap{rnd.randint(0, 40)}", "stateful": True} if kind in ("snapshot", "restore") else {}
    if kind == "migrate":
        params = {"target_host": target.name, "strategy": "auto"}
    working = [e for e in events if "progress" in e]  # all but the closing event
    return Operation(
        kind=kind,
        status=status,
        phase=working[-1]["phase"] if working else "queued",
        progress=100 if status == "success" else (working[-1]["progress"] if working else 0),
        container=c,
        container_name=c.name if c else "",
        host=host,
        target_host=target,
        params=params,
        result=result,
        error=error,
        events=events,
        created_by=rnd.choice(users + [None]),
        created_at=created,
        started_at=started,
        finished_at=(started + timedelta(seconds=rnd.uniform(0.2, 40))) if ended and started else None,
        worker="celery@dashboard" if started else "",
    )


def clear() -> None:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "TRUNCATE containers_operation, containers_snapshot, containers_container, hosts_host RESTART IDENTITY"
        )


# --- the measurements ----------------------------------------------------------------------


def endpoints(busiest: str) -> list[tuple[str, str, str]]:
    """(what, who, path): the lists and the filters operators use on them."""
    month_ago, half_year_ago = date.today() - timedelta(days=30), date.today() - timedelta(days=180)
    return [
        ("container list page", "page", "/containers/"),
        ("container list page, one host", "page", "/containers/?host=host-007"),
        ("container list page, stopped", "page", "/containers/?state=STOPPED"),
        ("container list page, page 5", "page", "/containers/?page=5"),
        ("snapshot search page", "page", "/snapshots/"),
        ("snapshot search page, text", "page", "/snapshots/?q=web-001"),
        (
            "snapshot search page, text + stateful + since",
            "page",
            f"/snapshots/?q=before-upgrade&stateful=true&since={half_year_ago}",
        ),
        ("snapshot search page, text matching nothing", "page", "/snapshots/?q=no-such-thing"),
        ("snapshot search page, text matching most snapshots", "page", "/snapshots/?q=snap"),
        ("snapshot search page, last 30 days", "page", f"/snapshots/?since={month_ago}"),
        ("snapshot search page, by user", "page", "/snapshots/?created_by=bob"),
        ("operations list page", "page", "/operations/"),
        ("operations list page, failures", "page", "/operations/?status=failure"),
        ("container timeline page (its busiest container)", "page", f"/containers/{busiest}/history/"),
        ("API containers (default limit 1000)", "api", "/api/v1/containers/"),
        ("API containers, limit 100", "api", "/api/v1/containers/?limit=100"),
        ("API containers, one host", "api", "/api/v1/containers/?host=host-007"),
        ("API containers, stopped, limit 100", "api", "/api/v1/containers/?state=STOPPED&limit=100"),
        ("API snapshot search", "api", "/api/v1/snapshots/"),
        ("API snapshot search, text", "api", "/api/v1/snapshots/?q=web-001"),
        ("API snapshot search, text matching nothing", "api", "/api/v1/snapshots/?q=no-such-thing"),
        ("API snapshot search, one letter (a quarter of the containers)", "api", "/api/v1/snapshots/?q=w"),
        ("API snapshot search, one host", "api", "/api/v1/snapshots/?host=host-007"),
        ("API snapshots of one container (its busiest)", "api", f"/api/v1/containers/{busiest}/snapshots/"),
        ("API operations", "api", "/api/v1/operations/"),
        ("API operations, running", "api", "/api/v1/operations/?status=running"),
        ("API operations, one container", "api", f"/api/v1/operations/?container={busiest}"),
        ("API operations, one host, migrations", "api", "/api/v1/operations/?host=host-007&kind=migrate"),
    ]


def clients():
    from django.contrib.auth import get_user_model
    from django.test import Client

    from core.models import ApiToken

    carol = get_user_model().objects.get(username="carol")
    page = Client()
    page.force_login(carol)
    _, key = ApiToken.issue(carol, "fleet bench")
    return {"page": page, "api": Client(HTTP_AUTHORIZATION=f"Token {key}")}


def measure(repeat: int) -> dict:
    from django.db import connection
    from django.db.models import Count
    from django.test.utils import CaptureQueriesContext

    from containers.models import Container

    busiest = Container.objects.annotate(n=Count("snapshots")).order_by("-n", "name").first().name
    who = clients()
    out = {}
    for what, kind, path in endpoints(busiest):
        client = who[kind]
        for _ in range(WARMUP):
            r = client.get(path)
            assert r.status_code == 200, (path, r.status_code, r.content[:300])
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            client.get(path)
            times.append((time.perf_counter() - t0) * 1000)
        # Counted twice, the lower kept: an API token's last-used time is written at most once a
        # minute, and that write has nothing to do with the number of rows.
        counts = []
        for _ in range(2):
            with CaptureQueriesContext(connection) as q:
                r = client.get(path)
            counts.append(len(q.captured_queries))
        rows = len(r.json()) if kind == "api" else None
        out[what] = {
            "path": path,
            "times": times,
            "queries": min(counts),
            "rows": rows,
            "sql": [x["sql"] for x in q.captured_queries],
        }
        print(
            f"  {what}: p50 {statistics.median(times):.1f} ms, p95 {percentile(times, 95):.1f} ms, "
            f"{min(counts)} queries" + (f", {rows} rows" if rows is not None else ""),
            file=sys.stderr,
            flush=True,
        )
    return out


def run(repeat: int, sql_out: Path | None = None) -> dict:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from core.roles import set_role

    call_command("migrate", verbosity=0)
    for name, role in [
        ("alice", "admin"),
        ("bob", "operator"),
        ("carol", "viewer"),
        ("erin", "operator"),
        ("frank", "operator"),
    ]:
        set_role(get_user_model().objects.create_user(name, password=f"{name}-password-1"), role)

    small_scale = {k: v // SMALL_DIVISOR for k, v in FULL.items()}
    measured = {}
    for label, scale in (("small", small_scale), ("full", FULL)):
        clear()
        t0 = time.monotonic()
        made = generate(scale)
        print(f"fleet: {label}: generated {made} in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]
        timings = measure(repeat)
        made["load"] = f"{load:.1f} before, {os.getloadavg()[0]:.1f} after"
        measured[label] = (made, timings)
    (full_rows, full), (small_rows, small) = measured["full"], measured["small"]
    if sql_out:
        sql_out.write_text(json.dumps({k: v["sql"] for k, v in full.items()}, indent=1))
    rows = {}
    for what, m in full.items():
        t = m["times"]
        label = f"{what}: `{m['path']}`" + (f" ({m['rows']} rows)" if m["rows"] is not None else "") + ", ms"
        rows[label] = {
            "n": len(t),
            "median": round(statistics.median(t), 1),
            "p95": round(percentile(t, 95), 1),
            "min": round(min(t), 1),
            "max": round(max(t), 1),
            "queries": m["queries"],
            "queries_small": small[what]["queries"],
            "median_small": round(statistics.median(small[what]["times"]), 1),
        }
    slow = [k for k, v in rows.items() if v["p95"] >= TARGET_P95_MS]
    grew = [k for k, v in rows.items() if v["queries"] != v["queries_small"]]
    print(
        f"fleet: p95 at or over {TARGET_P95_MS} ms: {slow or 'none'}; query count grew: {grew or 'none'}",
        file=sys.stderr,
    )
    return {"rows": rows, "full": full_rows, "small": small_rows}


SECTION = f"fleet scale on PostgreSQL (target: p95 under {TARGET_P95_MS} ms, SQL queries independent of rows)"


def note(out: dict, repeat: int) -> str:
    f, s = out["full"], out["small"]
    return (
        f"{f['hosts']} hosts, {f['containers']:,} containers, {f['snapshots']:,} snapshots, {f['operations']:,} "
        f"operations in a private PostgreSQL (`bench/fleet.py`). Server time in ms, in-process (Django test client: "
        f"routing, middleware, auth, SQL, rendering; no network), pages as a viewer's session, API with a viewer's "
        f"token; {repeat} requests each after {WARMUP} warm-ups. SQL queries per request with all rows / with "
        f"1/{SMALL_DIVISOR} of them ({s['hosts']} hosts, {s['containers']:,} containers, {s['snapshots']:,} snapshots, "
        f"{s['operations']:,} operations); the JSON also has the median at 1/{SMALL_DIVISOR} (median_small). "
        f"The machine is shared: 1-minute load average {f['load']} the measurements with all rows."
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", type=Path, help="write the rows here (bench/run.py reads them)")
    ap.add_argument("--sql", type=Path, help="write each endpoint's SQL at full scale here (to study a plan)")
    args = ap.parse_args()
    if args.repeat < 20:
        ap.error("--repeat must be at least 20 for a p95")
    pgdir = tempfile.mkdtemp(prefix="ctweb-fleet-pg-")  # its own: the postgres user must reach it
    started = subprocess.run(
        ["bash", str(ROOT / "scripts" / "postgres.sh"), "start", pgdir, str(PORT)], capture_output=True, text=True
    )
    if started.returncode:
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", pgdir], check=False)
        sys.exit(f"fleet: PostgreSQL did not start: {started.stderr.strip()}")
    url = started.stdout.strip()
    tmp = tempfile.mkdtemp(prefix="ctweb-fleet-")
    try:
        os.environ.update(
            DJANGO_SETTINGS_MODULE="ctweb.settings",
            DATABASE_URL=url,
            CTWEB_VAR_DIR=os.path.join(tmp, "var"),
            CTWEB_PLAIN_STATIC="1",
            ALLOWED_HOSTS="testserver",
            LOG_LEVEL="WARNING",
            SECRET_KEY=os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
        )
        os.makedirs(os.path.join(tmp, "var", "static"))  # WhiteNoise looks for it; the bench serves no files
        out = run(args.repeat, args.sql)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", pgdir], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"section": SECTION, "note": note(out, args.repeat), "rows": out["rows"]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
