"""Pure decisions: placement and migration. No I/O, no clock reads."""

from gpuscout.policy.eligibility import fits_catalog
from gpuscout.policy.job_placement import PlacementDecision, place_job
from gpuscout.policy.migration import (
    ZONE_BACKOFF_S,
    JobView,
    MoveCosts,
    MoveDecision,
    MovePolicy,
    Trigger,
    behind_uniform_progress,
    budget_left,
    deadline_slack_s,
    decide_move,
    dwell_s,
    move_cost_usd,
    plan_moves,
    remaining_work_hours,
    spot_reserve_s,
    uniform_progress_line,
    zone_key,
)
from gpuscout.policy.placement import (
    Offers,
    Placement,
    choose_offer,
    offer_for,
    offers_for,
    pricing,
)

__all__ = [
    "JobView", "MoveCosts", "MoveDecision", "MovePolicy", "Offers", "Placement",
    "PlacementDecision", "Trigger", "behind_uniform_progress", "budget_left", "choose_offer",
    "deadline_slack_s", "decide_move", "dwell_s", "fits_catalog", "move_cost_usd", "offer_for",
    "offers_for", "place_job", "plan_moves", "pricing",
    "remaining_work_hours", "spot_reserve_s", "uniform_progress_line", "zone_key",
    "ZONE_BACKOFF_S",
]
