"""After a failed or cancelled migration: nothing half-made stays on the target, and the
source keeps the container (roll back), unless the target already runs it (roll forward,
recovery.py). Never both copies running, never none; what cannot be known makes the
operation wait (the source keeps its dump untouched) and an admin may decide."""

from __future__ import annotations

from operations.events import publish_fleet
from operations.runner import KEEP_WAITING, OperationContext, OperationFailed, WaitFor

from ..models import Container
from .common import call, db_write
from .phases import ROLL_BACK, Progress


def roll_back(
    ctx: OperationContext,
    src,
    dst,
    container,
    base,
    committed,
    live,
    was_running,
    error: OperationFailed,
    waiting_actions: list[dict] | None = None,
) -> None:
    """After a failure: nothing half-made stays on the target, and the source keeps the container.
    `dst` is None when the target cannot be reached at all. `waiting_actions` (a post-copy's
    decisions): where the source was stopped and the target cannot be confirmed clean, the
    operation waits with them instead of settling anything. A post-copy always waits there
    (with no actions if none are given): its lazy dump holds every page not yet pulled, and the
    keep-state clean-up below would end it."""
    progress = Progress.rest_of(ctx, ROLL_BACK)
    target_name = ctx.op.target_host.name if ctx.op.target_host else "the target"
    ctx.event("cleanup", f"migration failed: {error.message}; cleaning up the target")
    target_clean = False
    if dst is None:
        ctx.event("cleanup", f"{container.name}'s target cannot be reached: it could not be confirmed clean")
    else:
        try:
            call(dst, progress, "abort-target", "migrate-abort", base)
            target_clean = True
        except OperationFailed as e:
            ctx.event("cleanup", f"the target could not be confirmed clean: {e.message}")
    if not committed and was_running and ctx.op.result.get("stopping"):
        # The dump may have gone through although nobody heard of it (its agent or the
        # link died first): the source's word decides. `inspect` waits for a dump still
        # running there, and thaws what an interrupted one left frozen. No answer is no
        # answer: the operation waits and asks again (recovery.py), it guesses nothing.
        try:
            seen = call(src, progress, "inspect-source", "inspect", {**base, "thaw": True})
            committed = seen.get("exists") and seen.get("state") == "STOPPED"
            # A lazy dump goes on without its agent: CRIU holds the tasks frozen as a page
            # server. Only migrate-resume gives them back (and copes with one rolled back).
            committed = committed or bool((seen.get("migration") or {}).get("lazy_dump"))
        except OperationFailed as e:
            ctx.event("cleanup", f"could not ask {src.host.name} how {container.name} is: {e.message}")
            raise WaitFor(
                f"{error.message.strip()} {src.host.name} could not be asked whether {container.name} was stopped "
                f"there ({e.message}); ctweb asks it again until it answers."
            ) from e
    if committed and not target_clean and ctx.op.params.get("strategy") != "post-copy":
        # The source is stopped and the target may run it: nothing is guessed. The source
        # keeps its dump as it is, the operation waits for the target, and an admin may decide.
        db_write(lambda: Container.objects.filter(pk=container.pk).update(state=Container.State.STOPPED))
        raise WaitFor(
            f"{error.message.strip()} {container.name} is stopped on {src.host.name}"
            f"{' with its memory dumped' if live else ''}; {target_name} could not be confirmed clean, so it may "
            f"run there. ctweb asks {target_name} again until it answers.",
            unreachable_target_actions(src.host.name, target_name, live),
        )
    if committed and not target_clean and (waiting_actions is not None or ctx.op.params.get("strategy") == "post-copy"):
        # A post-copy: the source's frozen tasks hold every page not yet pulled, the target may
        # run it with some of them. Nothing is guessed or removed; the recovery asks both
        # hosts again (it goes on with the pull, or resumes the source), an admin may decide.
        raise WaitFor(
            f"{error.message.strip()} {target_name} could not be confirmed clean during {container.name}'s "
            f"post-copy: nothing was removed on either host. ctweb asks both again; an admin may decide.",
            waiting_actions,
        )
    if committed and not target_clean:
        # The target may be running it: resuming the source could make two. Keep the
        # source stopped with its memory as saved state, and say so.
        try:
            data = call(
                src, progress, "cleanup-source", "migrate-cleanup", {**base, "remove": False, "keep_state": True}
            )
            saved = bool(data.get("has_saved_state"))
        except OperationFailed:
            saved = False
        Container.objects.filter(pk=container.pk).update(state=Container.State.STOPPED, has_saved_state=saved)
        error.message += (
            f" {container.name} is stopped on {src.host.name}{' with its memory saved' if saved else ''}; "
            f"{target_name} could not be confirmed clean, so check it before starting {container.name} again."
        )
        return
    if not committed:
        try:
            call(src, progress, "cleanup-source", "migrate-cleanup", {**base, "remove": False})
        except OperationFailed:
            pass
        if not target_clean:
            error.message += (
                f" {container.name} stayed on {src.host.name}; {target_name} could not be confirmed clean: what this "
                f"migration left there is removed when ctweb next reaches it."
            )
        else:
            error.message += f" {container.name} stayed on {src.host.name}; nothing is left on {target_name}."
        return
    # The source was stopped for the move. Resuming it there is safe: the target copy is gone.
    try:
        if live:
            data = call(src, progress, "resume-source", "migrate-resume", base)
        else:
            data = (
                call(src, progress, "resume-source", "start", {"name": container.name})
                if was_running
                else {"state": "STOPPED"}
            )
        Container.objects.filter(pk=container.pk).update(state=data.get("state", "RUNNING"))
        error.message += f" {container.name} was resumed on {src.host.name}."
        try:  # it runs from them again: the dump and the working files can go
            call(src, progress, "cleanup-source", "migrate-cleanup", {**base, "remove": False})
        except OperationFailed as e:
            ctx.event("cleanup", f"the migration's working files on {src.host.name} could not be removed: {e.message}")
    except OperationFailed as e:
        if e.unanswered:
            # No answer is no answer (the link to the source is still down): the source keeps
            # its dump, and the operation waits and resumes it there once it answers.
            db_write(lambda: Container.objects.filter(pk=container.pk).update(state=Container.State.STOPPED))
            raise WaitFor(
                f"{error.message.strip()} {container.name} is stopped on {src.host.name}"
                f"{' with its memory dumped' if live else ''} and nothing is left on {target_name}; resuming it "
                f"there got no answer ({e.message}). ctweb asks {src.host.name} again and resumes it there."
            ) from e
        saved = bool((e.result or {}).get("has_saved_state"))
        Container.objects.filter(pk=container.pk).update(state=Container.State.STOPPED, has_saved_state=saved)
        error.message += f" Resuming it on {src.host.name} failed too ({e.message}); it is stopped there" + (
            " with its memory saved: Start resumes it." if saved else "."
        )
    container.refresh_from_db()
    publish_fleet("container", {"name": container.name, "host": src.host.name, "state": container.state})


RESUME_SOURCE = "resume-source"


def unreachable_target_actions(source: str, target: str, live: bool) -> list[dict]:
    return [
        {
            "id": RESUME_SOURCE,
            "label": f"Resume on {source}" + (" from its dump" if live else ""),
            "consequence": f"It runs on {source} again at once{' from the state it was dumped in' if live else ''}. "
            f"The copy on {target}, if any, is removed when {target} is reachable again; if {target} was already "
            "running it, what ran there since is lost.",
        },
        {
            "id": KEEP_WAITING,
            "label": f"Keep waiting for {target}",
            "consequence": f"Nothing changes: {target} is asked again now and then until it answers, and the "
            "migration then finishes or rolls back by itself.",
        },
    ]
