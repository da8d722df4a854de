"""A stack of several nodes, as a fleet deploys ctweb (docs/ARCHITECTURE.md, deploy/): two web
nodes (daphne) and two Celery workers, each with its own node name and its own var directory
(CTWEB_VAR_DIR: what a node keeps on its own machine), one beat, all on one private PostgreSQL
cluster (scripts/postgres.sh) and one Redis. What the nodes share is only what a fleet shares:
the database, Redis, SECRET_KEY, the fleet's SSH key (a copy in each node's var directory) and
the bundle storage (a directory standing for shared storage).

Everything started here is stopped by the pid recorded when it was started; the PostgreSQL
cluster by scripts/postgres.sh stop, which removes its directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import requests

from tests.support.stack import ROOT, VENV_BIN, Process, Stack, free_port, wait_for

WEBS = ("web1", "web2")
WORKERS = ("worker1", "worker2")
# A lost worker's row is taken over after this long without a heartbeat (production: 60 s;
# settings.OPERATION_LOST_AFTER_S), so a test need not wait a minute for it.
LOST_AFTER_S = 15


def start_postgres() -> tuple[Path, str]:
    """A private PostgreSQL cluster (scripts/postgres.sh): its directory and DATABASE_URL."""
    pgdir = Path(tempfile.mkdtemp(prefix="ctweb-pg-"))
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "postgres.sh"), "start", str(pgdir), str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if p.returncode != 0:
        shutil.rmtree(pgdir, ignore_errors=True)
        raise RuntimeError(f"scripts/postgres.sh start failed:\n{p.stdout}\n{p.stderr}")
    return pgdir, p.stdout.strip().splitlines()[-1]


def stop_postgres(pgdir: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", str(pgdir)], timeout=60)


class MultiNodeStack(Stack):
    """Stack's API (url, tokens, manage, python, logs) with web1 as `url`; `urls[name]` for each
    web node, `workers[name]` the node name each worker runs under (Operation.worker)."""

    def __init__(self, concurrency: int = 4):
        self.pgdir, database_url = start_postgres()
        try:
            super().__init__(concurrency, database_url=database_url)
        except BaseException:
            stop_postgres(self.pgdir)
            raise
        shared = self.dir / "shared-bundles"
        shared.mkdir()
        self.env.update(
            CTWEB_LOST_AFTER=str(LOST_AFTER_S),
            CTWEB_BUNDLE_STORAGE=json.dumps(
                {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(shared)}}
            ),
        )
        self.urls: dict[str, str] = {}
        self.node_names = {name: f"{name}@multinode" for name in WORKERS}

    def node_env(self, node: str) -> dict:
        """A node's environment: the fleet's, with its own var directory and its own copy of the key."""
        var = self.dir / f"var-{node}"
        (var / "ssh").mkdir(parents=True, exist_ok=True)
        key = Path(self.env["CTWEB_SSH_KEY"])
        for src in (key, key.with_suffix(".pub")):
            if src.exists() and not (var / "ssh" / src.name).exists():
                shutil.copy2(src, var / "ssh" / src.name)
        return {**self.env, "CTWEB_VAR_DIR": str(var), "CTWEB_SSH_KEY": str(var / "ssh" / key.name)}

    def start(self) -> MultiNodeStack:
        self.procs["redis"] = Process(
            "redis",
            ["redis-server", "--port", "0", "--unixsocket", str(self.dir / "redis.sock"), "--unixsocketperm", "700",
             "--dir", str(self.dir), "--save", "", "--appendonly", "no"],
            self.env,
            self.dir / "redis.log",
        ).start()  # fmt: skip
        wait_for(lambda: (self.dir / "redis.sock").exists(), 10, "redis")
        self.manage("migrate", "--noinput", "-v", "0")
        self.manage("sshkey")  # the fleet's key, made once; each node gets its copy (node_env)
        for name in WORKERS:
            self.start_worker(name)
        self.start_beat()
        for name in WEBS:
            # Each web node serves the static files it collected into its own var directory.
            env = self.node_env(name)
            subprocess.run(
                [str(VENV_BIN / "python"), "manage.py", "collectstatic", "--noinput", "-v", "0"],
                env=env, cwd=ROOT, check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            self.urls[name] = self.start_web(name, free_port())
        self.url = self.urls["web1"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def start_web(self, name: str, port: int) -> str:
        url = f"http://127.0.0.1:{port}"
        self.procs[name] = Process(
            name,
            [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "ctweb.asgi:application"],
            self.node_env(name),
            self.dir / f"{name}.log",
        ).start()
        wait_for(lambda: requests.get(url + "/accounts/login/", timeout=2).status_code == 200, 30, name)
        return url

    def start_worker(self, name: str = "worker1") -> Process:
        log = self.dir / f"{name}.log"
        seen = log.read_text(errors="replace").count("ready.") if log.exists() else 0
        proc = Process(
            name,
            [str(VENV_BIN / "celery"), "-A", "ctweb", "worker", "--pool", "threads", "--concurrency",
             str(self.concurrency), "-n", self.node_names[name], "--without-gossip", "--without-mingle",
             "--loglevel", "INFO"],
            self.node_env(name),
            log,
        ).start()  # fmt: skip
        self.procs[name] = proc
        wait_for(lambda: log.read_text(errors="replace").count("ready.") > seen, 30, f"celery {name}")
        return proc

    def start_beat(self) -> Process:
        env = self.node_env("beat")
        proc = Process(
            "beat",
            [str(VENV_BIN / "celery"), "-A", "ctweb", "beat", "--schedule",
             str(Path(env["CTWEB_VAR_DIR"]) / "celerybeat-schedule"), "--loglevel", "INFO"],
            env,
            self.dir / "beat.log",
        ).start()  # fmt: skip
        self.procs["beat"] = proc
        wait_for(lambda: "beat: Starting" in proc.log.read_text(errors="replace"), 30, "celery beat")
        return proc

    def worker_of(self, op_id: int) -> str:
        """The node name that holds an operation's row now (Operation.worker)."""
        out = self.python(
            f"from operations.models import Operation; print(Operation.objects.get(pk={int(op_id)}).worker)"
        )
        return out.strip().splitlines()[-1] if out.strip() else ""

    def stop(self) -> None:
        try:
            super().stop()  # every process, then the temporary directory
        finally:
            stop_postgres(self.pgdir)
