"""`migrate-abort` on a target whose cut-off restore still holds the container's lock: the
abort ends that restore first (named by the migration's images directory), so the agent that
held the lock ends and the abort gets it, instead of waiting out the lock's limit and failing
"another ctweb job is still working" (the lab's [post-copy-worker-restore] fault case). The agent
runs as its own process here, as on a host, in a temporary root."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The agent that started the restore: it holds the lock for as long as its restore runs.
HOLDER = textwrap.dedent(
    """
    import fcntl, os, subprocess, sys
    lock, images, ready = sys.argv[1:4]
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    # A restore waiting for pages nobody serves: a process named criu, restoring from `images`.
    criu = subprocess.Popen(["criu", "-c", "import time; time.sleep(120)", "restore", "-D", images],
                            executable=sys.executable)
    open(ready, "w").write(str(criu.pid))
    sys.exit(criu.wait() and 0)
    """
)

# The abort, through the agent's own entry point (its lock, its dispatch), in `root`.
ABORT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from tests.support.agent_loader import load_agent
    root = Path(sys.argv[1])
    agent = load_agent(root=root)
    agent.S.LOCKS_PATH = str(root / "ctweb" / "locks")
    sys.exit(agent.commands.main(["ctweb-agent", "migrate-abort"]))
    """
).format(repo=str(ROOT))


def test_an_abort_ends_the_restore_that_holds_the_lock_and_then_takes_the_lock(tmp_path):
    images = tmp_path / "ctweb" / "migrations" / "7" / "images"
    images.mkdir(parents=True)
    locks = tmp_path / "ctweb" / "locks"
    locks.mkdir(mode=0o700)
    ready = tmp_path / "criu.pid"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(locks / "c1.lock"), str(images), str(ready)])
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        criu = int(ready.read_text())
        t0 = time.monotonic()
        abort = subprocess.run(
            [sys.executable, "-c", ABORT, str(tmp_path)],
            input=json.dumps({"name": "c1", "migration": 7}) + "\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - t0
        lines = [json.loads(x) for x in abort.stdout.splitlines() if x.startswith("{")]
        assert abort.returncode == 0, (abort.stdout, abort.stderr)
        assert not any(x.get("type") == "error" for x in lines), lines
        assert took < 15, took  # not the lock's 30 s limit
        assert not os.path.exists(f"/proc/{criu}") or "Z" in Path(f"/proc/{criu}/stat").read_text().split()[2]
        assert holder.wait(timeout=10) == 0  # the agent holding the lock ended with its restore
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
