"""What past moves say a move costs. Pure.

The settings estimate a move's phases (``MoveCosts``); once moves have been
measured, the median of the last ones replaces each estimate, and how far
the slow restarts ran past the median widens the deadline reserves
(``MoveCosts.restart_spread_s``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace

from gpuscout.domain import Migration
from gpuscout.policy.migration import MoveCosts

# Past moves whose measured phases replace the estimates (most recent).
MEASURED_MOVES = 20
# A phase is measured once at least this many of those moves timed it.
MIN_MEASURED = 3


def measured_move_costs(completed: Sequence[Migration], setups: Mapping[str, float] | None,
                        default: MoveCosts) -> MoveCosts:
    """``default`` (the settings' estimates), each replaced by the median of
    the last ``MEASURED_MOVES`` completed moves that measured it (three at
    least), and how far their slow restarts (boot + restore, 90th
    percentile) ran past the median. ``setups`` (instance id -> seconds) is
    what each replacement spent on its job's setup: a job's own cost
    (``ControlPlane``'s ``with_setup``), not the machine's, so it is left out
    of the measured boots."""
    recent = sorted(completed, key=lambda m: m.started_at.timestamp() if m.started_at
                    else 0.0)[-MEASURED_MOVES:]
    setups = setups or {}

    def span(m: Migration, start: str, end: str) -> float | None:
        a, b = getattr(m, start), getattr(m, end)
        if a is None or b is None:
            return None
        seconds = (b - a).total_seconds()
        if (start, end) == ("started_at", "replacement_ready_at"):
            seconds = max(0.0, seconds - setups.get(m.to_instance_id or "", 0.0))
        return seconds

    def measured(start: str, end: str) -> float | None:
        spans = [s for m in recent if (s := span(m, start, end)) is not None]
        return statistics.median(spans) if len(spans) >= MIN_MEASURED else None

    boot = measured("started_at", "replacement_ready_at")
    checkpoint = measured("replacement_ready_at", "checkpointed_at")
    restore = measured("checkpointed_at", "resumed_at")
    restarts = [b + r for m in recent
                if (b := span(m, "started_at", "replacement_ready_at")) is not None
                and (r := span(m, "checkpointed_at", "resumed_at")) is not None]
    spread = default.restart_spread_s
    if len(restarts) >= MIN_MEASURED:
        p90 = statistics.quantiles(restarts, n=10, method="inclusive")[-1]
        spread = max(0.0, p90 - statistics.median(restarts))
    return replace(
        default,
        boot_s=default.boot_s if boot is None else boot,
        checkpoint_s=default.checkpoint_s if checkpoint is None else checkpoint,
        restore_s=default.restore_s if restore is None else restore,
        restart_spread_s=spread,
    )
