"""python -m lab up|up-bare|down|status|build [--hosts N] [--key PUBKEY_FILE] [--json]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lab import core


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab", description="ctweb lab hosts (LXC + CRIU in namespaces)")
    ap.add_argument("command", choices=["up", "up-bare", "down", "status", "build"])
    ap.add_argument("--hosts", type=int, default=2, help="number of hosts for up (default 2)")
    ap.add_argument(
        "--key", help="public key file authorised for root on the hosts (default ~/.ssh/id_ed25519.pub if present)"
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        if args.command != "status":
            core.require_root()
        if args.command == "build":
            print(core.build_rootfs())
            return 0
        if args.command in ("up", "up-bare"):
            key = None
            path = Path(args.key) if args.key else Path.home() / ".ssh" / "id_ed25519.pub"
            if args.key or path.exists():
                key = path.read_text().strip()
            if args.command == "up-bare" and key is None:
                print("lab: up-bare needs --key (the bare host's root gets only that key)", file=sys.stderr)
                return 2
            # up-bare: lab-z with sshd, python3 and apt sources only (see lab/core.py up_bare)
            hosts = core.up(args.hosts, key) if args.command == "up" else [core.up_bare(key)]
            if args.json:
                print(json.dumps(hosts, indent=1))
            else:
                for h in hosts:
                    print(f"{h['name']} {h['username']}@{h['address']}:{h['port']} pid {h['pid']} {h['host_key']}")
            return 0
        if args.command == "down":
            core.down()
            return 0
        rows = core.status()
        if args.json:
            print(json.dumps(rows, indent=1))
        elif not rows:
            print("lab is down")
        for r in rows:
            state = "running" if r["running"] else "stopped"
            print(f"{r['name']} {r['address']} {state} pid={r['pid']} sshd={r['sshd'] or 'no answer'}")
        return 0 if rows and all(r["running"] and r["sshd"] for r in rows) else 1
    except core.LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
