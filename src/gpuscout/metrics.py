"""Prometheus metrics of one control plane (its own registry, so several
control planes can live in one process, as they do in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter("gpuscout_jobs_submitted", "Jobs submitted", registry=r)
        self.jobs_by_status = Gauge("gpuscout_jobs", "Jobs by status", ["status"], registry=r)
        self.migrations = Counter("gpuscout_migrations", "Migrations finished",
                                  ["reason", "status"], registry=r)
        self.migration_downtime = Histogram(
            "gpuscout_migration_downtime_seconds",
            "Last step on the old instance to first step on the new",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.instances_launched = Counter("gpuscout_instances_launched", "Instances launched",
                                          registry=r)
        self.cost_usd = Gauge("gpuscout_cost_usd", "Cost of all jobs so far", registry=r)
        self.savings_usd = Gauge(
            "gpuscout_savings_usd",
            "What all jobs would have cost on their first offer, less what they cost",
            registry=r)
        self.scout_passes = Counter("gpuscout_scout_passes", "Scout passes", registry=r)
        self.instances_reaped = Counter("gpuscout_instances_reaped",
                                        "Unowned instances terminated by the reaper", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
