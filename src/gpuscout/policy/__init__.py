"""Pure decisions: placement and migration. No I/O, no clock reads."""

from gpuscout.policy.eligibility import fits_catalog
from gpuscout.policy.job_placement import PlacementDecision, place_job
from gpuscout.policy.migration import (
    BUDGET_THRESHOLDS,
    ZONE_BACKOFF_S,
    JobView,
    MoveCosts,
    MoveDecision,
    MovePolicy,
    Trigger,
    behind_uniform_progress,
    budget_allows,
    budget_left,
    budget_thresholds_reached,
    deadline_slack_s,
    decide_move,
    dwell_s,
    expected_price,
    move_cost_usd,
    plan_moves,
    projected_cost_usd,
    remaining_work_hours,
    spot_reserve_s,
    uniform_progress_line,
    weigh_move,
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
    "BUDGET_THRESHOLDS", "JobView", "MoveCosts", "MoveDecision", "MovePolicy", "Offers",
    "Placement",
    "PlacementDecision", "Trigger", "behind_uniform_progress", "budget_allows", "budget_left",
    "budget_thresholds_reached", "choose_offer",
    "deadline_slack_s", "decide_move", "dwell_s", "expected_price", "fits_catalog",
    "move_cost_usd", "offer_for",
    "offers_for", "place_job", "plan_moves", "pricing", "projected_cost_usd",
    "remaining_work_hours", "spot_reserve_s", "uniform_progress_line", "weigh_move", "zone_key",
    "ZONE_BACKOFF_S",
]
