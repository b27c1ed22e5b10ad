"""Pure decisions: placement and migration. No I/O, no clock reads."""

from gpuscout.policy.eligibility import (
    eligible,
    fits_catalog,
    in_avoided_zone,
    why_ineligible,
    zone_key,
)
from gpuscout.policy.job_placement import PlacementDecision, place_job
from gpuscout.policy.migration import (
    BUDGET_THRESHOLDS,
    MOVE_RULES,
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
    stale_offers,
    uniform_progress_line,
    weigh_move,
)
from gpuscout.policy.past_moves import measured_move_costs
from gpuscout.policy.placement import (
    Offers,
    offer_for,
    offers_for,
    pricing,
)

__all__ = [
    "BUDGET_THRESHOLDS", "MOVE_RULES", "JobView", "MoveCosts", "MoveDecision", "MovePolicy",
    "Offers", "PlacementDecision", "Trigger", "behind_uniform_progress", "budget_allows",
    "budget_left", "budget_thresholds_reached", "deadline_slack_s", "decide_move", "dwell_s",
    "eligible", "expected_price", "fits_catalog", "in_avoided_zone", "measured_move_costs",
    "move_cost_usd", "offer_for", "offers_for", "place_job", "plan_moves", "pricing",
    "projected_cost_usd", "remaining_work_hours", "spot_reserve_s", "stale_offers",
    "uniform_progress_line", "weigh_move", "why_ineligible", "zone_key", "ZONE_BACKOFF_S",
]
