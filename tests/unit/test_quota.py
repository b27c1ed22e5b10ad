"""A launch refused by the account's quota is named as such (a ``quota``
event, not ``capacity``), and a job with no offer left says why: not "the
job's resources" when offers fit but are out for now."""

from __future__ import annotations


def test_a_quota_refusal_is_named_as_the_accounts_limit_not_the_jobs_resources(
        service, provider) -> None:  # type: ignore[no-untyped-def]
    from gpuscout.domain import JobSpec, JobStatus, Resources
    from gpuscout.providers.base import QuotaError

    for offer in service.repo.list_offers():  # one offer fits: p3.2xlarge spot in 1a
        if offer.id != "local:us-east-1a:p3.2xlarge:spot":
            service.plane.update_offer(offer.id, available=False)
    provider.next_launch_error = QuotaError("local:us-east-1a:p3.2xlarge:spot",
                                            "VcpuLimitExceeded: vCPU limit of 8 reached")
    job = service.plane.submit(JobSpec(name="q", command="true", resources=Resources(gpus=1)))
    for _ in range(3):
        service.plane.reconcile_once()
    events = {e.kind: e.message for e in service.repo.list_events(job.id)}
    assert events["quota"].startswith("account quota reached launching "
                                      "local:us-east-1a:p3.2xlarge:spot: VcpuLimitExceeded")
    assert "capacity" not in events
    assert service.repo.get_job(job.id).status == JobStatus.SCOUTING
    reason = service.plane.decisions[job.id].reason
    assert reason.startswith("every offer that fits the job's resources")
    assert "a launch that failed: see the job's events" in reason
