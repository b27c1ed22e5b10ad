"""Pure decisions: placement and migration. No I/O, no clock reads."""

from gpuscout.policy.migration import MoveDecision, MovePolicy, decide_move, plan_moves
from gpuscout.policy.placement import Offers, Placement, choose_offer

__all__ = [
    "MoveDecision", "MovePolicy", "Offers", "Placement", "choose_offer", "decide_move",
    "plan_moves",
]
