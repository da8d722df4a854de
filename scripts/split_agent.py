"""Split a single-file host agent (the old hosts/agent/ctweb_agent.py) into the modules of the
package hosts/agent/ctweb_agent/, the way the package was made: for porting changes that
other branches made to the single file. Every top-level statement goes, unchanged, to the
module of its section (the `# --- ...` headers and the names below), or of its name
(MOVED); the module-global state (STATE) goes to state.py and is read and set as S.NAME
everywhere else; each module imports what it uses from the others. __init__.py and
__main__.py are hand-written and left alone. Then ruff sorts and formats.

    .venv/bin/python scripts/split_agent.py OLD_AGENT.py hosts/agent/ctweb_agent
    git diff hosts/agent/ctweb_agent   # the other branch's change, in its module

Refuses a split whose modules would import each other in a cycle (move the new name in
MOVED, or SECTIONS, then)."""

from __future__ import annotations

import ast
import graphlib
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

# A section header (the start of a `# --- ` comment line), or `def NAME`/`NAME =` where a
# module starts without one: everything from there on goes to that module.
SECTIONS = [
    ("# --- probe", "probe"),
    ("# --- containers (LXC)", "lxc"),
    ("def cmd_create", "containers"),
    ("# --- CRIU: snapshots", "criu"),
    ("# --- decoding CRIU images", "contents"),
    ("# --- debug bundle", "bundle"),
    ("# --- migration", "migrate"),
    ("def _tarinfo", "images"),
    ("# --- direct transfer", "transfer"),
    ("# --- post-copy", "lazy"),
    ("def cmd_inspect", "commands"),
]
# Names that live elsewhere than their section (to keep the modules' imports one-way).
MOVED = {
    **dict.fromkeys(
        ["_ms", "_now", "_flag", "_write_json", "_read_json", "_remove_tree", "_du", "_NOFOLLOW_DIR"], "common"
    ),
    **dict.fromkeys(["_criu_stats", "_image_files", "PAGE_SIZE"], "contents"),
    **dict.fromkeys(["_templates", "_network"], "lxc"),
    **dict.fromkeys(["_describe", "cmd_list", "_migration_dirs"], "containers"),
    **dict.fromkeys(["_sanitize_received_config", "_sanitize_received_snapshots"], "images"),
    "cmd_cpuinfo_check": "migrate",
}
STATE = [
    "LXC_PATH",
    "CTWEB_PATH",
    "SNAPSHOTS_PATH",
    "STATE_PATH",
    "BUNDLES_PATH",
    "LOCKS_PATH",
    "MIGRATIONS_PATH",
    "LOCK_FD",
    "DETACHED",
]
DOCS = {
    "state": "The agent's module-global state, in one place: where it works on this host (tests point these\n"
    "into a temporary directory) and what one run holds (its container lock, whether the dashboard\n"
    "went away). Every module reads and sets them as `S.NAME` (`from . import state as S`).",
    "common": "What every part of the agent uses: errors, JSON-lines output (emit/event), running a\n"
    "program from an argument list, name checks, small file helpers, root-only modes.",
    "probe": "`probe`: what this host offers (kernel, CPU, CRIU, LXC, pycriu, templates, network, disk).",
    "lxc": "LXC containers on this host: their directories and configs, the config allowlist\n"
    "(docs/SECURITY.md), states, networks, lxc-start/lxc-stop.",
    "containers": "The container subcommands: list, create, start, stop (stateful or not), restart, delete.",
    "criu": "CRIU checkpoints: snapshots (stateful or not), restore, the saved state of a stateful stop,\n"
    "lxc-checkpoint, freezing and thawing, disk checks.",
    "contents": "What a CRIU dump holds: its image files and statistics, decoded with pycriu (processes,\n"
    "files, sockets, mounts) for `snapshot-contents` and the snapshot's record.",
    "bundle": "`bundle`: a debug bundle of a container's logs and configs, without secrets.",
    "migrate": "Migration on each host: the migration's working directory, prepare/check, what `send`\n"
    "archives, the CPU check.",
    "images": "Moving a container's files as tars: `send` (walked without following any symlink) and\n"
    "`receive` (staged beneath the receiving directory, checked, then put in place), relayed by the\n"
    "dashboard or direct (see transfer).",
    "transfer": "Direct host-to-host transfer (only on networks an admin allowed): the one-time token, the\n"
    "hello and the HMAC-SHA256 trailer, the listening receiver and the connecting sender.",
    "lazy": "Post-copy (lazy pages): the source's lazy dump, the target's lazy-pages daemon, the\n"
    "resumable page relay between them, and the migrate-dump/-restore/-resume/-abort/-cleanup steps.",
    "commands": "The subcommands: `inspect`, the per-container lock, the dispatch table (the one list of\n"
    "subcommands, which the dashboard takes from here) and main().",
}
AGENT_FILE = '''

def agent_file():
    """The file this agent runs from: the .pyz whose members are this package's modules
    (a page relay is started from it)."""
    return os.path.abspath(os.path.dirname(os.path.dirname(__file__)))
'''
DASHBOARD_COMMANDS = """RAW_OUTPUT = {"send", "pages-attach"}
# Started by the agent itself (migrate-dump/-restore start their page relay), never asked for.
INTERNAL = {"pages-relay"}
# The subcommands the dashboard may ask for: hosts/agent takes them from here, and its SSH
# module refuses any other word.
DASHBOARD_COMMANDS = frozenset(COMMANDS) - INTERNAL
"""


def _names(node) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name)]
    return []


def split(source: str) -> dict[str, str]:
    lines = source.splitlines(keepends=True)
    chunks: dict[str, list[str]] = {}
    stdlib: list[str] = []
    section, prev_end = "common", 0
    for node in ast.parse(source).body:
        start = (node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno) - 1
        lead, code = "".join(lines[prev_end:start]), "".join(lines[start : node.end_lineno])
        prev_end = node.end_lineno
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            stdlib += [a.name for a in node.names]
            continue
        if isinstance(node, (ast.Expr, ast.If)):
            continue  # the module docstring, the __main__ guard
        for marker, module in SECTIONS:
            if any(line.startswith(marker) for line in lead.splitlines()) or code.startswith(marker + "("):
                section = module
        names = _names(node)
        if any(n in STATE for n in names):
            module = "state"
        else:
            module = next((MOVED[n] for n in names if n in MOVED), section)
        if module != section and "# ---" in lead:
            chunks.setdefault(section, []).append(lead)  # the section's header stays with it
            lead = "\n\n"
        chunks.setdefault(module, []).append(lead + code)
    out = {m: "".join(c) for m, c in chunks.items()}
    out["common"] += AGENT_FILE
    return _assemble(out, stdlib)


def _substitute(code: str) -> str:
    code = re.sub(r"^[ \t]*global (LOCK_FD|DETACHED)\n", "", code, flags=re.M)
    code = code.replace("os.path.abspath(__file__)", "agent_file()")
    code = re.sub(r"\{(" + "|".join(STATE) + r")\}", r"{S.\1}", code)  # inside f-strings
    toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
    at = [
        t.start
        for i, t in enumerate(toks)
        if t.type == tokenize.NAME and t.string in STATE and not (i and toks[i - 1].string == ".")
    ]
    ls = code.splitlines(keepends=True)
    for row, col in sorted(at, reverse=True):
        ls[row - 1] = ls[row - 1][:col] + "S." + ls[row - 1][col:]
    return "".join(ls)


def _state(code: str) -> str:
    """The state's statements: the paths, then what one run holds."""
    stmts = {_names(node)[0]: code.splitlines()[node.lineno - 1] for node in ast.parse(code).body}
    comments = {
        "MIGRATIONS_PATH": "  # <migration id>/: one migration's working files",
        "LOCK_FD": "# The descriptor of the container's lock while this run holds it (see main()).\n",
        "DETACHED": "# True once the dashboard's end of stdout is gone: the job goes on to a known state, quietly.\n",
    }
    out = ["import os\n\n"]
    for n in STATE:
        line = stmts[n]
        if n == "MIGRATIONS_PATH" and "#" not in line:
            line += comments[n]
        if n in ("LOCK_FD", "DETACHED"):
            line = comments[n] + line
        if n == "LOCK_FD":
            line = "\n" + line
        out.append(line + "\n")
    return "".join(out)


def _assemble(chunks: dict[str, str], stdlib: list[str]) -> dict[str, str]:
    texts = {m: (code if m == "state" else _substitute(code)) for m, code in chunks.items()}
    owner = {n: m for m, code in texts.items() for node in ast.parse(code).body for n in _names(node)}
    graph: dict[str, set[str]] = {}
    files = {}
    for m, code in texts.items():
        used = {x.id for x in ast.walk(ast.parse(code)) if isinstance(x, ast.Name)}
        imports: dict[str, list[str]] = {}
        for n in sorted(used):
            if n in owner and owner[n] != m:
                imports.setdefault(owner[n], []).append(n)
        graph[m] = set(imports)
        head = [f'"""{DOCS[m]}"""\n\n']
        if m == "state":
            files[m] = head[0] + _state(code)
            continue
        head += [f"import {n}\n" for n in stdlib if n in used]
        if "S" in used:
            head.append("\nfrom . import state as S\n")
        head += [f"from .{o} import {', '.join(names)}\n" for o, names in sorted(imports.items())]
        body = code.lstrip("\n")
        if m == "commands":
            body = body.replace('RAW_OUTPUT = {"send", "pages-attach"}\n', DASHBOARD_COMMANDS, 1)
        files[m] = "".join(head) + "\n\n" + body
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        sys.exit(f"the modules would import each other in a cycle: {e.args[1]}; see MOVED")
    return files


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for m, text in split(Path(argv[1]).read_text()).items():
        (out / f"{m}.py").write_text(text)
    ruff = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "ruff"
    subprocess.run([str(ruff), "check", "--fix", "-q", str(out)], check=False)
    subprocess.run([str(ruff), "format", "-q", str(out)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
