"""The ctweb lab: simulated LXC/CRIU hosts in Linux namespaces on this machine.

See ``lab.core`` for the API (``build_rootfs``, ``up``, ``down``, ``status``)
and ``python -m lab up|down|status|build`` for the command line.  Stdlib only.
What it writes into its hosts (their init, sshd's and LXC's configuration, the offline
debian template) are files in ``lab/files/``.  A tool beside the product: the dashboard
(``manage.py lab``) and the tests use it; nothing of the product imports it.
"""
