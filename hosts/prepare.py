"""Prepare a host: install and check, over its pinned SSH connection, what ctweb needs on a
Debian 12, Debian 13 or Ubuntu 24.04 server (LXC, a CRIU that runs on its kernel, pycriu,
rsync, iptables, the container bridge and the network description the probe reads), then
probe it. One operation of kind `prepare`, admin only (docs/API.md, docs/HOSTS.md).

The decision (which system and kernel get which packages, or which refusal) is `plan`, pure:
the agent's `prepare` subcommand only reports facts and carries out the steps it is given.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone

from core.api import ApiError
from core.audit import Actor, audit
from operations.models import Operation
from operations.runner import OperationContext, OperationFailed, enqueue, handler

from . import ssh
from .handlers import failure, set_host_status
from .models import Host

SUPPORTED = "Debian 12, Debian 13 and Ubuntu 24.04"
# Everything ctweb's agent runs besides CRIU (docs/HOSTS.md names what each is for).
BASE_PACKAGES = (
    "lxc",
    "lxc-templates",
    "busybox-static",
    "iptables",
    "rsync",
    "iproute2",
    "procps",
    "psmisc",
    "zstd",
    "xz-utils",
    "python3",
)
# The kernel split the vDSO's data pages into [vvar] and [vvar_vclock] in 6.13 (commit
# e93d2521b27f); CRIU before 4.1 dies on every command there: "vdso: Unexpected rt vDSO area
# bounds" (measured with Debian 12's 3.17.1 on 6.18, docs/LAB-NOTES.md).
VVAR_VCLOCK_KERNEL = (6, 13)
# From 6.16 CRIU 4.1.x cannot dump any TCP or UDP socket ("Can't get 1:16 opt"); 4.2 can
# (docs/LAB-NOTES.md). Debian 13 ships 4.1.1; sid ships a newer one.
INET_SOCKOPT_KERNEL = (6, 16)
NEWER_CRIU_SUITE = "sid"
NEWER_CRIU_PACKAGES = ("criu", "python3-pycriu")
DEFAULT_BRIDGE = "lxcbr0"
DEFAULT_RANGE = (100, 250)


class Refused(Exception):
    """This host cannot run ctweb's CRIU, said in one sentence."""


@dataclass(frozen=True)
class Plan:
    system: str  # "Debian 13"
    kernel: str
    packages: tuple[str, ...]
    # Packages taken from another suite of the same registry (pinned: nothing else comes from it).
    extra_suite: str | None = None
    extra_packages: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def as_params(self) -> dict:
        return {
            "packages": list(self.packages),
            "extra_suite": self.extra_suite,
            "extra_packages": list(self.extra_packages),
        }


def kernel_version(release: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", release or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def plan(facts: dict, host_name: str = "this host") -> Plan:
    """What to install on a host with these facts (the agent's `prepare` facts step), or
    Refused with the one sentence that says why ctweb's CRIU cannot work there."""
    os_id = str(facts.get("os_id") or "").lower()
    version = str(facts.get("version_id") or "")
    pretty = str(facts.get("pretty_name") or "").strip() or "an unknown system"
    release = str(facts.get("kernel") or "")
    kernel = kernel_version(release)
    if not facts.get("root"):
        user = facts.get("user") or "the SSH user"
        raise Refused(
            f"Preparing {host_name} needs root, and ctweb's agent runs there as {user}, who is not root: connect "
            "as root, or give the SSH user the sudo rules of docs/HOSTS.md."
        )
    if not facts.get("apt"):
        raise Refused(f"{host_name} runs {pretty} without apt-get: ctweb prepares only {SUPPORTED} hosts.")
    if kernel is None:
        raise Refused(f"{host_name}'s kernel release {release!r} cannot be read, so no CRIU can be chosen for it.")
    shown = f"{kernel[0]}.{kernel[1]}"
    if (os_id, version) == ("debian", "12"):
        if kernel >= VVAR_VCLOCK_KERNEL:
            raise Refused(
                f"Debian 12's CRIU 3.17 cannot run on {host_name}'s kernel {shown}: it dies on the vDSO "
                "layout of kernels from 6.13 ('vdso: Unexpected rt vDSO area bounds'); use Debian 13, "
                "or boot Debian 12's own 6.1 kernel."
            )
        # Debian 12's criu package carries pycriu itself (there is no python3-pycriu).
        return Plan("Debian 12", release, (*BASE_PACKAGES, "criu"))
    if (os_id, version) == ("ubuntu", "24.04"):
        if kernel >= VVAR_VCLOCK_KERNEL:
            raise Refused(
                f"Ubuntu 24.04's CRIU 3.17 cannot run on {host_name}'s kernel {shown}: it dies on the vDSO "
                "layout of kernels from 6.13 ('vdso: Unexpected rt vDSO area bounds'); boot the 6.8 "
                "kernel Ubuntu 24.04 ships (linux-generic), or use Debian 13."
            )
        # criu is in universe there; its package carries pycriu (the check step confirms it).
        return Plan("Ubuntu 24.04", release, (*BASE_PACKAGES, "criu"))
    if (os_id, version) == ("debian", "13"):
        if kernel >= INET_SOCKOPT_KERNEL:
            return Plan(
                "Debian 13",
                release,
                BASE_PACKAGES,
                NEWER_CRIU_SUITE,
                NEWER_CRIU_PACKAGES,
                (
                    f"Debian 13's CRIU 4.1.1 cannot dump TCP or UDP sockets on kernel {shown}: CRIU and "
                    f"pycriu come from {NEWER_CRIU_SUITE} (pinned, nothing else does).",
                ),
            )
        return Plan("Debian 13", release, (*BASE_PACKAGES, "criu", "python3-pycriu"))
    raise Refused(f"{host_name} runs {pretty}: ctweb prepares only {SUPPORTED} hosts.")


def unavailable(chosen: Plan, package: str, host_name: str) -> str:
    """The sentence for a package the host's apt sources do not have."""
    if chosen.system == "Ubuntu 24.04":
        return (
            f"{package} is not in {host_name}'s apt sources: on Ubuntu 24.04 it is in the universe component; "
            "enable universe (add-apt-repository universe), then prepare again."
        )
    return f"{package} is not in {host_name}'s apt sources: add {chosen.system}'s main archive, then prepare again."


def check_network(value) -> dict | None:
    """The container network an admin gave (or None): {bridge, subnet, range, gateway},
    validated; ApiError (400) otherwise. The agent checks it again on the host."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError("network must be an object {bridge, subnet, range, gateway}.", 400, "network")
    unknown = set(value) - {"bridge", "subnet", "range", "gateway"}
    if unknown:
        raise ApiError(f"network has unknown field(s): {', '.join(sorted(unknown))}.", 400, "network")
    bridge = value.get("bridge", DEFAULT_BRIDGE)
    if not isinstance(bridge, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge):
        raise ApiError("network.bridge must be an interface name (1-15 letters, digits, _ . -).", 400, "network")
    subnet = value.get("subnet")
    try:
        net = ipaddress.IPv4Network(subnet) if isinstance(subnet, str) else None
    except ValueError:
        net = None
    if net is None or not 8 <= net.prefixlen <= 29:
        raise ApiError("network.subnet must be an IPv4 network such as 10.0.3.0/24.", 400, "network")
    rng = value.get("range", list(DEFAULT_RANGE))
    if (
        not isinstance(rng, list)
        or len(rng) != 2
        or not all(type(n) is int for n in rng)
        or not 1 <= rng[0] <= rng[1] <= 254
    ):
        raise ApiError("network.range must be [first, last] last octets, 1 <= first <= last <= 254.", 400, "network")
    gateway = value.get("gateway")
    if gateway is not None:
        try:
            gw = ipaddress.IPv4Address(gateway) if isinstance(gateway, str) else None
        except ValueError:
            gw = None
        if gw is None or gw not in net:
            raise ApiError("network.gateway must be an address of network.subnet (or null).", 400, "network")
        gateway = str(gw)
    return {"bridge": bridge, "subnet": str(net), "range": rng, "gateway": gateway}


def start_prepare(actor: Actor, host: Host, network: dict | None = None, queue: bool = True) -> Operation:
    """Write (and unless `queue` is False, queue) the prepare of a trusted host, one at a time
    per host; `network` is checked here. `manage.py host prepare` runs it in its own process."""
    network = check_network(network)
    if not host.is_trusted:
        raise ApiError(
            host.status_message or "The host key changed."
            if host.is_blocked
            else f"{host.name} is not trusted: an admin must check and trust its host key first.",
            409,
        )
    with transaction.atomic():
        Host.objects.select_for_update().filter(pk=host.pk).first()
        # Two at once would fight over apt's lock; a probe beside it is harmless.
        busy = Operation.objects.filter(host=host, kind=Operation.Kind.PREPARE, status__in=Operation.ACTIVE).first()
        if busy:
            raise ApiError(f"{host.name} has a {busy.kind} running (operation {busy.pk}).", 409)
        op = Operation.objects.create(
            kind=Operation.Kind.PREPARE,
            host=host,
            created_by=actor.user,
            phase="queued",
            params={"network": network} if network else {},
        )
        if queue:
            enqueue(op)
    audit(actor, "host.prepare", host, detail=f"operation {op.pk}")
    return op


# The steps of a prepare, in order, and their shares of the progress bar (they add up to 100).
STEPS = (
    ("connect", 5),
    ("facts", 5),
    ("packages", 60),
    ("network", 5),
    ("check", 10),
    ("probe", 15),
)


def at(step: str, fraction: float = 0.0) -> int:
    """The progress of a prepare `fraction` (0..1) through `step`."""
    done = 0
    for name, share in STEPS:
        if name == step:
            return int(done + share * max(0.0, min(1.0, fraction)))
        done += share
    raise KeyError(step)


def _share(step: str) -> int:
    return dict(STEPS)[step]


@handler("prepare")
def prepare(ctx: OperationContext) -> dict:
    host = ctx.op.host
    if host is None:
        raise OperationFailed("The host of this prepare was removed.")
    network = ctx.op.params.get("network")
    bridge = (network or {}).get("bridge") or DEFAULT_BRIDGE
    ctx.event("connect", f"connecting to {host.name} ({host.address}:{host.port})", at("connect"))
    try:
        with ssh.connect(host) as conn:
            conn.ensure_agent()

            def step(name: str, params: dict, timeout: float = 300) -> dict:
                relay = ctx.relay(at(name), _share(name))
                return conn.run_agent("prepare", {"step": name, **params}, on_event=relay, timeout=timeout).data

            ctx.event("facts", "reading the system, kernel and user", at("facts"))
            facts = step("facts", {})
            ctx.remember(facts=facts)
            try:
                chosen = plan(facts, host.name)
            except Refused as e:
                raise OperationFailed(str(e), host=host.name) from None
            ctx.event(
                "facts",
                f"{chosen.system}, kernel {facts.get('kernel')}: installing "
                + ", ".join(chosen.packages + chosen.extra_packages),
                at("facts", 1),
            )
            for note in chosen.notes:
                ctx.event("facts", note)
            ctx.remember(plan={"system": chosen.system, **chosen.as_params()})
            ctx.check_cancel()
            try:
                installed = step("packages", {**chosen.as_params(), "bridge": bridge}, timeout=1800)
            except ssh.AgentFailed as e:
                missing = re.search(r"Unable to locate package (\S+)", f"{e}\n{e.details}")
                if missing is None or isinstance(e, ssh.AgentLost):
                    raise
                raise OperationFailed(
                    unavailable(chosen, missing.group(1), host.name), e.details, host=host.name
                ) from None
            ctx.event("network", "checking the container bridge and network description", at("network"))
            described = step("network", {"network": network, "bridge": bridge})
            ctx.event("check", "checking CRIU, pycriu and LXC", at("check"))
            checked = step("check", {})
            ctx.event("probe", "probing", at("probe"))
            caps = conn.run_agent("probe", {}, on_event=ctx.relay(at("probe"), _share("probe")), timeout=300).data
    except ssh.SSHError as e:
        raise failure(e, host) from e
    set_host_status(host, Host.Status.ONLINE, "", capabilities=caps, last_probe_at=timezone.now())
    ctx.event("probe", f"{host.name} is prepared: CRIU {caps.get('criu_version')}, {caps.get('lxc_version')}", 100)
    return {
        "system": chosen.system,
        "kernel": facts.get("kernel"),
        "packages": installed.get("packages", {}),
        "network": described,
        "check": checked,
        "capabilities": caps,
    }
