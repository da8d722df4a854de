"""How a migration's tars travel from the source's agent to the target's: relayed by the
worker over both hosts' SSH connections (encrypted), or directly host to host over TLS 1.3
with certificates made for each stream where an admin allowed it (core/fleet.py); and what
the result says about it."""

from __future__ import annotations

import time

from django.conf import settings

from core.fleet import direct_route
from hosts import ssh
from hosts.models import Host
from hosts.pagecerts import PageLinkKeys
from operations.runner import OperationContext, OperationFailed

from .phases import Progress


class Transfer:
    """How this migration's tars travel (decided once, when it starts) and the bytes moved."""

    def __init__(self, source: Host, target: Host, strategy: str, migration: int = 0):
        self.source, self.target, self.strategy = source, target, strategy
        self.route, self.why = direct_route(source, target)
        self.bytes = 0
        self.relayed = 0  # of those, the bytes that crossed the dashboard (all of them unless direct)
        self.memory_in_images: int | None = None  # bytes of memory pages in the dump's images
        # Post-copy's pages: host to host over TLS where the route is direct (the relays fall
        # back to the dashboard's pump if that link cannot be made), else relayed over SSH.
        self.pages = {"stop-and-copy": "in-images", "post-copy": "ssh-relay"}.get(strategy, "none")
        self.pages_why: str | None = None
        self.keys: PageLinkKeys | None = None
        if self.route and strategy == "post-copy":
            self.pages = "direct-tls"
            self.keys = PageLinkKeys(migration)

    def pages_fell_back(self, why: str) -> None:
        """The direct page link could not be made: the pages go through the dashboard."""
        self.pages, self.pages_why, self.keys = "ssh-relay", why, None

    def direct_pages_source(self) -> dict | None:
        """migrate-dump's `direct_pages`: the source's relay listens for the target's."""
        if self.keys is None:
            return None
        return self.keys.for_source(self.route["source_address"], self.route["target_address"])

    def direct_pages_target(self, port: int) -> dict | None:
        """migrate-restore's `direct_pages`: the target's relay connects to the source's port."""
        if self.keys is None:
            return None
        return self.keys.for_target(self.route["target_address"], self.route["source_address"], port)

    def describe(self) -> dict:
        """What `result.transfer` says: the path of the images and of the memory pages."""
        r = self.route
        pages = self.pages
        return {
            "images": "direct-tls" if r else "ssh-relay",
            "images_encrypted": True,
            "network": r["network"] if r else None,
            "source_address": r["source_address"] if r else None,
            "target_address": r["target_address"] if r else None,
            "pages": pages,
            "pages_encrypted": {"in-images": True, "ssh-relay": True, "direct-tls": True}.get(pages),
            "pages_why": self.pages_why,  # why a direct page path fell back to the dashboard
            # Memory that travelled inside the images (all of it for stop-and-copy; for
            # post-copy the few pages CRIU cannot serve lazily).
            "memory_in_images_bytes": self.memory_in_images,
            "why": self.why,
        }

    def sentence(self) -> str:
        """What `result.transport` says, in words."""
        r = self.route
        if r:
            images = (
                f"sent directly from {self.source.name} ({r['source_address']}) to {self.target.name} "
                f"({r['target_address']}) over TLS 1.3 on {r['network']} (allowed by an admin; encrypted, both "
                "hosts authenticated by certificates made for each stream)"
            )
        else:
            images = "relayed through the dashboard over both hosts' SSH connections"
        if self.strategy == "post-copy":
            held = ""
            if r and self.memory_in_images:
                held = (
                    f" ({self.memory_in_images / 1024:.0f} KiB of pages CRIU cannot serve lazily went with the images)"
                )
            if self.pages == "direct-tls":
                how = (
                    f"linked directly host to host over TLS 1.3 on {r['network']} (encrypted, both hosts "
                    "authenticated by this migration's own certificates)"
                )
            else:
                how = "relayed by the dashboard over SSH (encrypted)"
                if self.pages_why:
                    how += f": the direct page link could not be made ({self.pages_why})"
            return (
                f"images {images}{held}; memory pulled by the target from the source's CRIU page server "
                f"through both hosts' resumable page relays, {how}"
            )
        if r:
            return f"root filesystem, snapshots and images {images}"
        return f"{images} (encrypted)"

    def announce(self) -> str:
        if self.route:
            return f"transfer: directly host to host over TLS 1.3 ({self.why}); " + (
                "memory pages host to host over TLS 1.3 (encrypted, authenticated)"
                if self.strategy == "post-copy"
                else "memory included"
            )
        return f"transfer: relayed through the dashboard over SSH, encrypted ({self.why})"


def warm(src, dst, hosts) -> tuple:
    """A relay's two streams started ahead (see ssh.AgentProcess): started before the freeze,
    their SSH handshakes and the agents' start-up cost no downtime."""
    sender = src.stream("send", None, "sending host")
    hosts.callback(sender.close)
    receiver = dst.stream("receive", None, "receiving host")
    hosts.callback(receiver.close)
    return sender, receiver


def send(
    src, dst, progress: Progress, step: str, params: dict, label: str, xfer: Transfer, warmed: tuple | None = None
) -> dict:
    """Move one tar from the source agent to the target agent as `step`, reporting bytes as
    they go: relayed by this worker over SSH, or directly between the hosts where an admin
    allowed it. `warmed`: the relay's two streams, started ahead by `warm`."""
    ctx: OperationContext = progress.ctx
    last = [0.0, 0.0]

    def on_bytes(n: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25:
            last[0] = now
            progress.event("transfer", f"{label}: {n / 1048576:.1f} MiB", step, bytes=xfer.bytes + n, what=label)
            ctx.check_cancel()  # a cancel stops the copy mid-stream (both ends are closed)

    def on_tick() -> None:  # a direct stream that moves nothing for a while still hears a cancel
        now = time.monotonic()
        if now - last[1] >= 0.5:
            last[1] = now
            ctx.check_cancel()

    how = f" (sent directly on {xfer.route['network']})" if xfer.route else ""
    try:
        # The receiver gives up on its own if nothing arrives for a while (a cut link).
        stall = {"stall_s": int(max(settings.SSH_DEAD_AFTER_S * 2, 10))}
        if xfer.route:
            n, result = ssh.direct(src, dst, {**params, **stall}, xfer.route, on_bytes, on_tick)
        else:
            sender, receiver = warmed or (src.stream("send", None, "sending host"), None)
            try:
                receiver = receiver or dst.stream("receive", None, "receiving host")
                sender.begin(params)
                receiver.begin({**params, **stall})
            except BaseException:
                sender.close()
                if receiver is not None:
                    receiver.close()
                raise
            n, result = ssh.relay(sender, receiver, on_bytes)
    except ssh.AgentFailed as e:
        raise OperationFailed(f"Transfer of the {label}{how} failed: {e}", e.details) from e
    except ssh.SSHError as e:
        raise OperationFailed(f"Transfer of the {label}{how} failed: {e}") from e
    xfer.bytes += n
    if not xfer.route:
        xfer.relayed += n
    progress.event("transfer", f"{label}: {n / 1048576:.1f} MiB sent", step, 1.0, bytes=xfer.bytes, what=label)
    dropped = (result or {}).get("config_dropped")
    if dropped:  # the target rewrote the config from its allowlist (docs/SECURITY.md)
        names = dropped if isinstance(dropped, list) else [f"{s}: {', '.join(k)}" for s, k in dropped.items()]
        progress.event(
            "config", f"{label}: the target dropped from the config: {'; '.join(map(str, names))}", step, 1.0
        )
    return result


def rootfs_delta(received: dict | None, ms: float) -> dict:
    """What `result.rootfs_delta` says of the delta sent while the container was down: which
    pass listed it (the source's change journal, or a walk of the whole tree, and why), from
    the target's answer (the source's word, passed on: checked for type here), and how long
    its transfer took on this worker."""
    said = (received or {}).get("delta")
    said = said if isinstance(said, dict) else {}
    kind = said.get("frozen_pass") if said.get("frozen_pass") in ("journal", "walk") else None
    reason = said.get("frozen_pass_reason")
    reason = reason[:500] if isinstance(reason, str) else None
    paths = said.get("frozen_pass_paths")
    listed = said.get("list_ms")
    out = {
        "pass": kind,
        "reason": reason,
        "paths": paths if isinstance(paths, int) and not isinstance(paths, bool) else None,
        "list_ms": listed if isinstance(listed, (int, float)) and not isinstance(listed, bool) else None,
        "ms": round(ms, 1),
    }
    if kind == "journal":
        out["sentence"] = f"rootfs delta from the change journal: {out['paths']} paths, {out['ms']:.0f} ms"
    elif kind == "walk":
        out["sentence"] = f"rootfs delta from a walk of the whole tree ({reason}), {out['ms']:.0f} ms"
    else:
        out["sentence"] = f"rootfs delta sent in {out['ms']:.0f} ms (the target did not say how it was listed)"
    return out
