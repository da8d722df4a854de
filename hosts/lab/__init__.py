"""The ctweb lab: simulated LXC/CRIU hosts in Linux namespaces on this machine.

See ``hosts.lab.core`` for the API (``build_rootfs``, ``up``, ``down``, ``status``)
and ``python -m hosts.lab up|down|status`` for the command line.  Stdlib only.
"""
