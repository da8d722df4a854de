"""The agent's module-global state, in one place: where it works on this host (tests point these
into a temporary directory) and what one run holds (its container lock, whether the dashboard
went away). Every module reads and sets them as `S.NAME` (`from . import state as S`)."""

import os

LXC_PATH = "/var/lib/lxc"
CTWEB_PATH = "/var/lib/ctweb"
SNAPSHOTS_PATH = os.path.join(CTWEB_PATH, "snapshots")  # <container>/<snapshot>/{rootfs,config,images,meta.json}
STATE_PATH = os.path.join(CTWEB_PATH, "state")  # <container>/images: the saved state of a stateful stop
BUNDLES_PATH = os.path.join(CTWEB_PATH, "bundles")  # op-<op>.tar.gz, fetched and deleted by the dashboard
LOCKS_PATH = os.path.join(CTWEB_PATH, "locks")  # <container>.lock: one changing job per container at a time
MIGRATIONS_PATH = os.path.join(CTWEB_PATH, "migrations")  # <migration id>/: one migration's working files

# The descriptor of the container's lock while this run holds it (see main()).
LOCK_FD = None
# True once the dashboard's end of stdout is gone: the job goes on to a known state, quietly.
DETACHED = False
