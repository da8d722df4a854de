"""ctweb host agent.

Shipped to each host by the dashboard as one zipapp of this package and run there as root
with the host's own python3: `python3 ctweb-agent-<hash>.pyz SUBCOMMAND`, parameters as one
JSON object on standard input. It prints one JSON object per line: events
({"type": "event", "phase": ..., "message": ..., "progress": ...}), then exactly one
{"type": "result", "data": {...}} or {"type": "error", "message": ..., "details": ...}.

Standard library only, plus what the host's distribution ships (lxc tools, criu,
pycriu). Every argument list is built here from validated values; no shell is used.

Modules, each importing only those below it: state (the module-global state, in one place),
journal (the change journal of a rootfs), common, lxc, contents, transfer, criu, check,
containers, bundle, mjournal (a migration's change journal, in a process of its own), migrate,
images, lazy, probe, commands (the dispatch table and main),
__main__.
"""
