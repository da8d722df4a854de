"""A real ctweb stack for end-to-end tests: its own Redis, database, Celery worker and
ASGI server in a temporary directory, plus OpenSSH servers the tests start themselves.

Everything started here is stopped by the pid recorded when it was started.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


# A log line at ERROR or worse in the stack's format ("<date> <time> ERROR <logger>: ..."),
# Celery's own ("[... ERROR/MainProcess] ...") or a bare traceback's first line.
ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) |\[[^]]* (ERROR|CRITICAL)/|^Traceback \(most recent call last\)")


BELOW_ERROR = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING) |\[[^]]* (DEBUG|INFO|WARNING)/")
# A line that starts a new entry (a log line, daphne's access log), not a traceback's.
NEW_LINE = re.compile(r"^(\d{4}-\d\d-\d\d |\[\d{4}-|\d+\.\d+\.\d+\.\d+:\d+ - )")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # keep waiting; report the last error on timeout
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


class Process:
    def __init__(self, name: str, argv: list[str], env: dict, log: Path, cwd: Path = ROOT):
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        f = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        f.close()
        return self

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Stack:
    def __init__(self, concurrency: int = 4, database_url: str | None = None):
        self.concurrency = concurrency
        self.dir = Path(tempfile.mkdtemp(prefix="ctweb-e2e-"))
        self.var = self.dir / "var"
        self.var.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ)
        self.env.update(
            CTWEB_VAR_DIR=str(self.var),
            REDIS_URL=f"unix://{self.dir}/redis.sock",
            PYTHONUNBUFFERED="1",
            CTWEB_SSH_TIMEOUT="5",
            CTWEB_SSH_DEAD_AFTER="10",
            # What every node of a fleet shares; the stack's nodes share these.
            SECRET_KEY=secrets.token_urlsafe(50),
            CTWEB_SSH_KEY=str(self.var / "ssh" / "id_ed25519"),
        )
        self.env.pop("SECRET_KEY_FILE", None)
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        self._pg_db = None
        if database_url:  # a database the caller made (and removes)
            self.env["DATABASE_URL"] = database_url
        elif os.environ.get("DATABASE_URL", "").startswith("postgres"):
            self._pg_db = f"ctweb_e2e_{os.getpid()}"
            self.env["DATABASE_URL"] = self._postgres("CREATE DATABASE", self._pg_db)
        self.procs: dict[str, Process] = {}
        self.workers = 0

    def _postgres(self, verb: str, name: str) -> str:
        import psycopg

        base = os.environ["DATABASE_URL"]
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'{verb} "{name}"')
        return base.rsplit("/", 1)[0] + "/" + name

    def manage(self, *args: str, input: str | None = None) -> str:
        p = subprocess.run(
            [str(VENV_BIN / "python"), "manage.py", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )
        if p.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def python(self, code: str) -> str:
        """Run Django code inside the stack's environment (for set-up that has no API)."""
        return self.manage("shell", "-c", code)

    def start(self) -> Stack:
        self.procs["redis"] = Process(
            "redis",
            [
                "redis-server",
                "--port",
                "0",
                "--unixsocket",
                str(self.dir / "redis.sock"),
                "--unixsocketperm",
                "700",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            self.env,
            self.dir / "redis.log",
        ).start()
        wait_for(lambda: (self.dir / "redis.sock").exists(), 10, "redis")
        self.manage("migrate", "--noinput", "-v", "0")
        self.manage("sshkey")  # the fleet's key, made once before any host exists (as scripts/setup.sh)
        # Static files as in production: collected, hashed, compressed, served by whitenoise.
        self.manage("collectstatic", "--noinput", "-v", "0")
        self.start_worker()
        self.start_beat()
        self.start_web("web", self.port)
        return self

    def start_web(self, name: str, port: int) -> str:
        """A web node (daphne) on 127.0.0.1:port, logging to <name>.log; its URL."""
        url = f"http://127.0.0.1:{port}"
        self.procs[name] = Process(
            name,
            [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "ctweb.asgi:application"],
            self.env,
            self.dir / f"{name}.log",
        ).start()
        wait_for(lambda: requests.get(url + "/accounts/login/", timeout=2).status_code == 200, 30, name)
        return url

    def start_worker(self, name: str = "e2e") -> Process:
        self.workers += 1
        proc = Process(
            "worker",
            [
                str(VENV_BIN / "celery"),
                "-A",
                "ctweb",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                str(self.concurrency),
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ],
            self.env,
            self.dir / "worker.log",
        ).start()
        self.procs["worker"] = proc
        log_start = self.dir / "worker.log"
        wait_for(lambda: log_start.read_text(errors="replace").count("ready.") >= self.workers, 30, "celery worker")
        return proc

    def start_beat(self) -> Process:
        """The one Celery beat of the stack, its own process as in production (Procfile)."""
        proc = Process(
            "beat",
            [
                str(VENV_BIN / "celery"),
                "-A",
                "ctweb",
                "beat",
                "--schedule",
                str(self.var / "celerybeat-schedule"),
                "--loglevel",
                "INFO",
            ],
            self.env,
            self.dir / "beat.log",
        ).start()
        self.procs["beat"] = proc
        wait_for(lambda: "beat: Starting" in proc.log.read_text(errors="replace"), 30, "celery beat")
        return proc

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        if self._pg_db:
            time.sleep(0.2)
            try:
                self._postgres("DROP DATABASE IF EXISTS", self._pg_db)
            except Exception as e:
                print(f"could not drop {self._pg_db}: {e}", file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- its logs -------------------------------------------------------------------

    def log_marks(self) -> dict[Path, int]:
        """Where each of the stack's Python logs (web, workers, beat) ends now."""
        return {path: path.stat().st_size for path in self._python_logs()}

    def _python_logs(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.log") if p.name.startswith(("web", "worker", "beat")))

    def errors_since(self, marks: dict[Path, int]) -> list[str]:
        """What the stack's processes logged at ERROR (or CRITICAL) after `marks` (and in logs
        begun since, such as another web node's), and any traceback printed outside a log line:
        one entry each, with its log's name and the traceback that follows it."""
        found = []
        later = {p: 0 for p in (self._python_logs() if hasattr(self, "dir") else []) if p not in marks}
        for path, start in {**marks, **later}.items():
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            block: list[str] | None = None
            quiet = False  # in the traceback of a line below ERROR (Django logs a 403 or 404 with one)
            for line in text.splitlines():
                if NEW_LINE.match(line):
                    block = None
                    quiet = bool(BELOW_ERROR.match(line))
                    if not ERROR_LINE.search(line):
                        continue
                elif block is not None:
                    if len(block) < 40:
                        block.append(line)  # its traceback
                    continue
                elif quiet or not ERROR_LINE.search(line):
                    continue
                block = [f"{path.stem}: {line}"]
                found.append(block)
        return ["\n".join(b) for b in found]

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{p.tail()}" for name, p in self.procs.items())

    # --- users and API ---------------------------------------------------------------

    def make_users(self) -> dict[str, str]:
        """alice admin, bob operator, carol viewer, dave no role; returns a token per user."""
        code = """
import json
from django.contrib.auth import get_user_model
from core.models import ApiToken
from core.roles import set_role
out = {}
for name, role in [("alice", "admin"), ("bob", "operator"), ("carol", "viewer"), ("dave", None)]:
    u, _ = get_user_model().objects.get_or_create(username=name)
    u.set_password(name + "-password-1"); u.save(); set_role(u, role)
    out[name] = ApiToken.issue(u, "e2e")[1]
print(json.dumps(out))
"""
        return json.loads(self.python(code).strip().splitlines()[-1])

    def dashboard_public_key(self) -> str:
        return self.python("from hosts.ssh import public_key_line; print(public_key_line())").strip().splitlines()[-1]


class SSHServer:
    """A real OpenSSH server on 127.0.0.1 with its own host key and config."""

    def __init__(self, authorized_key: str, directory: Path | None = None):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="ctweb-sshd-"))
        self.port = free_port()
        self.proc: Process | None = None
        (self.dir / "authorized_keys").write_text(authorized_key + "\n")
        os.chmod(self.dir / "authorized_keys", 0o600)
        self.new_host_key()

    def new_host_key(self) -> None:
        key = self.dir / "host_key"
        for p in (key, key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    def fingerprint(self) -> str:
        out = subprocess.run(
            ["ssh-keygen", "-lf", str(self.dir / "host_key.pub")], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[1]

    def start(self) -> SSHServer:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        cfg = self.dir / "sshd_config"
        cfg.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir}/host_key\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {self.dir}/sshd.pid\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n"
        )
        self.proc = Process(
            "sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], dict(os.environ), self.dir / "sshd.log"
        ).start()
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() or True, 10, "sshd")
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Api:
    """A script's view of ctweb: HTTP with a token, and websockets with the same token."""

    def __init__(self, stack: Stack, token: str | None):
        self.stack = stack
        self.headers = {"Authorization": f"Token {token}"} if token else {}

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, self.stack.url + path, headers=self.headers, timeout=30, **kwargs)

    def get(self, path: str, **kw):
        return self("GET", path, **kw)

    def post(self, path: str, **kw):
        return self("POST", path, **kw)

    def wait_operation(self, op_id: int, timeout: float = 60, interval: float = 0.2) -> dict:
        def done():
            op = self.get(f"/api/v1/operations/{op_id}/").json()
            return op if op["status"] in ("success", "failure", "cancelled") else None

        return wait_for(done, timeout, f"operation {op_id}", interval=interval)

    def ws_url(self, path: str) -> str:
        return self.stack.url.replace("http://", "ws://") + path


def run_op(api: Api, method: str, path: str, body=None, timeout: float = 180) -> dict:
    """Ask for long work (202) and wait for the operation to end."""
    r = api(method, path, json=body) if body is not None else api(method, path)
    assert r.status_code == 202, r.text
    return api.wait_operation(r.json()["id"], timeout=timeout)


def ok(op: dict) -> dict:
    assert op["status"] == "success", (op["error"], op.get("events", [])[-5:])
    return op
