"""The reaper: no instance outlives its job or runs unowned past one pass.

It compares what the provider runs with what the database says should run,
and terminates the difference. An instance launched a moment ago may not be
recorded on its job yet, so the reaper runs in the same thread as the job
lifecycle (which records it), and migration replacements are recorded on
their migration before they are launched.
"""

from __future__ import annotations

from gpuscout.controllers.context import Context, log
from gpuscout.db import NotFound
from gpuscout.domain import MigrationStatus
from gpuscout.providers.base import ProviderState


class Reaper:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def reap(self) -> list[str]:
        """One pass; returns the ids it terminated."""
        reaped: list[str] = []
        for pi in self.ctx.provider.list():
            if pi.state == ProviderState.TERMINATED:
                continue
            why = self._why_unowned(pi.instance_id)
            if why is None:
                continue
            log.warning("reaping %s: %s", pi.instance_id, why)
            self.ctx.provider.terminate(pi.instance_id)
            try:
                self.ctx.terminate(pi.instance_id)
            except NotFound:
                pass
            self.ctx.metrics.instances_reaped.inc()
            self.ctx.event(pi.job_id or None, "reaped", f"{pi.instance_id}: {why}",
                           instance_id=pi.instance_id)
            reaped.append(pi.instance_id)
        return reaped

    def _why_unowned(self, instance_id: str) -> str | None:
        try:
            instance = self.ctx.repo.get_instance(instance_id)
        except NotFound:
            return "no record of this instance"
        if instance.status.is_terminal():
            return f"its record says {instance.status.value}"
        job = self.ctx.repo.get_job(instance.job_id)
        if job.status.is_terminal():
            return f"its job is {job.status.value}"
        owners = {job.instance_id}
        for m in self.ctx.repo.list_migrations(job_id=job.id, status=MigrationStatus.IN_PROGRESS):
            if m.to_instance_id is None:
                return None  # its replacement is being launched right now
            owners |= {m.from_instance_id, m.to_instance_id}
        if instance_id not in owners:
            return f"job {job.id} no longer uses it"
        return None
