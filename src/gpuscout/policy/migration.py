"""Should a running job move, where, and why. Pure: no I/O, no clock reads.

The rule, for a job running on ``current``, as ordered rules
(``MOVE_RULES``: the first that decides, decides; each a pure function of a
``MoveSituation``):

0. *Market synced* (``market_synced``): offers older than
   ``MovePolicy.max_offer_age_s`` move nothing, and the decision says so.
1. *Forced moves* come first (``capacity_gone``, ``deadline_guard``). If
   the current offer is no longer available (spot capacity gone: the
   instance will be reclaimed), the job moves to
   the best offer that keeps its deadline, except that a job with a
   deadline goes to on-demand only when Uniform Progress asks for it
   (behind the line, or slack down to what one more scout interval of
   waiting leaves); otherwise it waits for spot. If the job runs on spot and
   its deadline slack has shrunk to what one preemption costs
   (``MoveCosts.preemption_loss_s``) plus the margin (``margin_s``), it moves to
   on-demand (Can't Be Late's guard: a preemption now would miss the
   deadline). Neither is held back by the dwell time or the cap.
2. *Price moves* (``held_back``, ``price_move``, ``within_limits``) need
   all of:
   - the job has stayed ``min_dwell_s`` since its last move (doubled for
     each price move so far, up to ``max_dwell_s``), and has made fewer than
     ``max_moves`` price moves (no ping-pong). A job on on-demand returning
     to spot is held by neither: spot was gone when it went there;
   - the target is at least ``savings_threshold`` cheaper per unit of work
     (price / relative speed);
   - the expected saving over the job's remaining work exceeds the cost of
     moving (``MoveCosts``: boot, checkpoint and restore time billed on the
     instances that are not training, and egress between regions). The
     saving is at the prices expected while the work runs
     (``expected_price``): a price that has held lately is taken to hold,
     one that keeps changing to change again as it has over the last day,
     so that a gap between two offers that keeps flipping is worth the
     minutes it is expected to last, not the rest of the job;
   - the move breaks neither the budget nor the deadline. Budget
     (``budget_allows``): a move that does not raise the projected total
     spend (cost so far + move cost + the remaining work at the target's
     $/work-hour, against staying: the remaining work at the current one)
     is always allowed, even when the job is already over its budget; one
     that raises it is refused only when the total would exceed the
     budget. Deadline: boot, downtime and the rest at the target's speed
     must fit, with room for one preemption when the target is spot.

Remaining work, in hours at relative speed 1.0, comes from
``expected_duration_hours`` and progress (step / total_steps) or, without a
step count, from the time the job has been running.

Every decision, moving or not, carries its reason and its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gpuscout.domain import Capacity, Job, JobStatus, Offer
from gpuscout.policy.eligibility import eligible
from gpuscout.policy.placement import Offers, offer_for, offers_for

# Prices are decimals in binary floats: 1 - 0.8/1.0 is 0.19999999999999996.
_EPS = 1e-9
# After a preemption notice, spot in that zone is not a target for this long
# (``JobView.avoid_zones``): the pool that just reclaimed the instance is
# likely to do it again soon. Ten minutes (five scout passes) and not longer:
# on the real traces, a longer ban mostly kept jobs on on-demand while spot
# in that zone was back (bench/policy.py, 2009-2013 prices: 1.152x the
# optimum with 30 minutes, 1.130x with 10; single zone 1.134x and 1.108x;
# the 9-zone and 2021 suites the same either way).
ZONE_BACKOFF_S = 600.0
# How many of the cheapest compatible offers a decision weighs in full
# (move cost, budget, deadline); the rest are dearer per work hour anyway.
_CANDIDATES = 16


class Trigger:
    """Why a move is proposed (``MoveDecision.trigger``)."""

    PRICE = "price"  # a cheaper placement pays for the move
    DEADLINE = "deadline"  # spot is too risky for the time left: on-demand
    CAPACITY = "capacity"  # the current offer is gone (spot reclaimed)
    PLACEMENT = "placement"  # a job without an instance: where (or whether) to launch


@dataclass(frozen=True, slots=True)
class MovePolicy:
    savings_threshold: float = 0.20
    # A job that just moved stays put this long (no ping-pong). Ten minutes
    # is five scout passes at the default interval, and short next to the
    # hours a training job runs.
    min_dwell_s: float = 600.0
    # Each price move multiplies the dwell by this, up to max_dwell_s, so a
    # market that keeps flipping gets followed less and less often (10 min,
    # 20, 40, ... 6 h) instead of spending the cap in the first hour.
    dwell_backoff: float = 2.0
    max_dwell_s: float = 6 * 3600.0
    # At most this many price-driven moves per job (None: no cap). Forced
    # moves (capacity gone, deadline) do not count and are never capped.
    max_moves: int | None = 10
    # Deadline slack kept beyond what a preemption or a restart costs, for
    # boot times and estimates that are off. On spot, slack only shrinks
    # when something happens (a preemption, a move), so the reserve is one
    # preemption's loss plus this margin (plus ``MoveCosts.restart_spread_s``
    # once past moves show how far restarts run past their estimate). One
    # minute: a third of the boot estimate, which is the top of EC2's 2-3
    # minute range. On the real traces 30 s and 60 s give the same costs and
    # 120 s costs more (bench/policy.py, 2009-2013: 1.070x against 1.082x):
    # with 120 s a job that fell back to on-demand needed six minutes of
    # slack to return to spot, and jobs with little slack stayed there.
    deadline_margin_s: float = 60.0
    # How long until the policy looks again (the scout interval): a job that
    # waits for spot must still make its deadline on on-demand after one
    # more wait, so waiting keeps this much slack on top of the margin.
    recheck_s: float = 120.0
    # The scout acts on offers at most this old (``stale_offers``: Karpenter's
    # ``Synced()`` guard); older, no job moves and each decision says so.
    # Ten minutes: two refreshes of the AWS price feed (every 300 s by
    # default), so one late or failed refresh does not stop moves and two
    # do; five scout passes at the default interval. A manual market is
    # never old (the table is the market); a trace replay is as old as its
    # last tick (``market.feeds.SyncedFeed``).
    max_offer_age_s: float = 600.0


@dataclass(frozen=True, slots=True)
class MoveCosts:
    """What a move costs, estimated by the caller (settings, past moves).

    Make-before-break: during ``boot_s`` the old instance still trains and
    only the replacement is billed for nothing; during checkpoint and
    restore neither trains and both are billed. A job with no instance pays
    the whole ``restart_s`` before training again; a preempted one pays
    ``preemption_loss_s``: its replacement boots from the notice on while
    the old instance trains until the emergency checkpoint.
    """

    boot_s: float = 180.0  # launch to the agent waiting in standby (EC2 GPU AMI: 2-3 min)
    checkpoint_s: float = 30.0  # to object storage, at the next step boundary
    restore_s: float = 60.0  # download, load, first step on the replacement
    notice_s: float = 120.0  # spot interruption notice (EC2: 2 minutes)
    egress_usd_per_gb: float = 0.02  # between regions of one provider (AWS: $0.02/GB)
    internet_egress_usd_per_gb: float = 0.09  # between providers
    # Per (from_region, to_region), overriding egress_usd_per_gb.
    region_egress_usd_per_gb: Mapping[tuple[str, str], float] = field(default_factory=dict)
    # How far past the estimate (boot + restore) the slow restarts have run
    # lately: 0 until moves are measured. The deadline reserves keep it on
    # top of the policy's margin.
    restart_spread_s: float = 0.0

    @property
    def downtime_s(self) -> float:
        return self.checkpoint_s + self.restore_s

    @property
    def restart_s(self) -> float:
        """A restart from scratch on a new instance (placement, recovery)."""
        return self.boot_s + self.restore_s

    @property
    def preemption_loss_s(self) -> float:
        """Training time a spot preemption costs: the replacement launched at
        the notice trains ``restart_s`` later, and the old instance trained
        until its emergency checkpoint (``notice_s - checkpoint_s`` of it
        counts). At least a move's downtime."""
        overlap = max(0.0, self.notice_s - self.checkpoint_s)
        return max(self.downtime_s, self.restart_s - overlap)

    def egress_per_gb(self, source: Offer, target: Offer) -> float:
        if source.provider != target.provider:
            return self.internet_egress_usd_per_gb
        if source.region == target.region:
            return 0.0
        return self.region_egress_usd_per_gb.get((source.region, target.region),
                                                 self.egress_usd_per_gb)


@dataclass(frozen=True, slots=True)
class JobView:
    """What the policy needs about a job that the Job value does not hold."""

    # Seconds the job has trained so far (all instances); used for the
    # remaining work when the job reports no total_steps. None: since
    # started_at.
    running_s: float | None = None
    price_moves: int = 0  # price-driven moves made so far (the cap)
    checkpoint_gb: float = 0.0  # size of its latest checkpoint (egress)
    # "provider:zone" whose spot capacity was just reclaimed: not a target.
    avoid_zones: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class MoveDecision:
    job_id: str
    move: bool
    reason: str
    current_offer_id: str | None
    target: Offer | None = None
    current_cost_per_work_hour: float | None = None
    target_cost_per_work_hour: float | None = None
    savings: float = 0.0  # fraction of the current cost per work hour
    trigger: str = Trigger.PRICE
    decided_at: datetime | None = None
    remaining_work_hours: float | None = None  # at relative speed 1.0
    # Saved over the remaining work after the switch, before the move cost.
    expected_saving_usd: float | None = None
    move_cost_usd: float | None = None
    budget_left_usd: float | None = None  # budget - spent; None without a budget
    deadline_slack_s: float | None = None  # if it stays; None without a deadline
    threshold: float | None = None

    @property
    def net_saving_usd(self) -> float | None:
        if self.expected_saving_usd is None or self.move_cost_usd is None:
            return None
        return self.expected_saving_usd - self.move_cost_usd

    def numbers(self) -> dict[str, object]:
        """The decision's numbers, for events and logs."""
        return {
            "move": self.move, "trigger": self.trigger,
            "current_offer_id": self.current_offer_id,
            "target_offer_id": self.target.id if self.target else None,
            "current_cost_per_work_hour": self.current_cost_per_work_hour,
            "target_cost_per_work_hour": self.target_cost_per_work_hour,
            "savings": self.savings, "threshold": self.threshold,
            "remaining_work_hours": self.remaining_work_hours,
            "expected_saving_usd": self.expected_saving_usd,
            "move_cost_usd": self.move_cost_usd, "budget_left_usd": self.budget_left_usd,
            "deadline_slack_s": self.deadline_slack_s,
        }


# --- pure helpers (also used by placement and the simulator) -----------------


def remaining_work_hours(job: Job, now: datetime, view: JobView | None = None,
                         speed: float = 1.0) -> float:
    """Work left, in hours at relative speed 1.0.

    With a step count: expected_duration_hours x (1 - step / total_steps).
    Without: expected_duration_hours less the time run so far x ``speed``
    (the relative speed it ran at). Never negative; a job past its estimate
    counts as nearly done.
    """
    total = max(0.0, job.spec.expected_duration_hours)
    p = job.progress
    if p.total_steps:
        done = min(1.0, max(0.0, p.step / p.total_steps))
        return total * (1.0 - done)
    running_s = view.running_s if view is not None else None
    if running_s is None:
        running_s = (now - job.started_at).total_seconds() if job.started_at else 0.0
    return max(0.0, total - max(0.0, running_s) / 3600.0 * speed)


def dwell_s(policy: MovePolicy, price_moves: int) -> float:
    """How long a job stays put after a move, given its price moves so far."""
    if policy.min_dwell_s <= 0:
        return 0.0
    grown = policy.min_dwell_s * policy.dwell_backoff ** max(0, price_moves - 1)
    return min(max(policy.min_dwell_s, policy.max_dwell_s), grown)


def uniform_progress_line(job: Job, now: datetime) -> float | None:
    """Fraction of the work Can't Be Late's Uniform Progress asks to have
    done by ``now``: time since submission / (deadline - submission)."""
    deadline = job.spec.deadline
    if deadline is None:
        return None
    span = (deadline - job.created_at).total_seconds()
    if span <= 0:
        return 1.0
    return min(1.0, max(0.0, (now - job.created_at).total_seconds() / span))


def behind_uniform_progress(job: Job, now: datetime, work_left: float,
                            costs: MoveCosts) -> bool:
    """Behind the line by more than one restart's worth of work (a fresh job
    is not behind a second after it was submitted). False without a deadline."""
    line = uniform_progress_line(job, now)
    total = job.spec.expected_duration_hours
    if line is None or total <= 0:
        return False
    progress = 1.0 - work_left / total
    return (line - progress) * total * 3600.0 > costs.restart_s


def margin_s(policy: MovePolicy, costs: MoveCosts) -> float:
    """Slack kept for estimates that are off: the policy's margin and the
    spread measured restarts have shown."""
    return policy.deadline_margin_s + max(0.0, costs.restart_spread_s)


def spot_reserve_s(policy: MovePolicy, costs: MoveCosts) -> float:
    """Deadline slack a job on spot keeps: one preemption and the margin."""
    return costs.preemption_loss_s + margin_s(policy, costs)


def wait_reserve_s(policy: MovePolicy, costs: MoveCosts) -> float:
    """Slack beyond the restart a job waiting for spot keeps: the margin
    after one more scout interval of waiting."""
    return margin_s(policy, costs) + policy.recheck_s


def budget_left(job: Job) -> float | None:
    if job.spec.budget_usd is None:
        return None
    return job.spec.budget_usd - job.cost_usd


# Fractions of its budget at which a job's projected cost is reported (an
# event each, once per job); at the last, ``on_budget: stop`` stops it.
BUDGET_THRESHOLDS = (0.8, 1.0)


def projected_cost_usd(job: Job, work_hours: float, cost_per_work_hour: float) -> float:
    """The job's projected total: cost so far + the remaining work (hours at
    relative speed 1.0) at ``cost_per_work_hour`` (the current offer's)."""
    return job.cost_usd + max(0.0, work_hours) * cost_per_work_hour


def budget_thresholds_reached(projected_usd: float, budget_usd: float | None) -> list[float]:
    """The fractions of ``BUDGET_THRESHOLDS`` the projection has reached."""
    if budget_usd is None or budget_usd <= 0:
        return []
    return [t for t in BUDGET_THRESHOLDS if projected_usd >= t * budget_usd - _EPS]


def budget_allows(left_usd: float | None, stay_usd: float, move_usd: float) -> bool:
    """The budget rule for a move. ``left_usd``: budget less cost so far
    (None: no budget); ``stay_usd``: the rest of the job where it is;
    ``move_usd``: the rest with the move (its cost included). A move that
    does not raise the projected total is always allowed, over budget or
    not; one that raises it is refused only if the total would exceed the
    budget."""
    if left_usd is None or move_usd <= stay_usd + _EPS:
        return True
    return move_usd <= left_usd + _EPS


def deadline_slack_s(job: Job, now: datetime, work_hours: float, speed: float,
                     overhead_s: float = 0.0) -> float | None:
    """Seconds to spare if the remaining work runs at ``speed`` after
    ``overhead_s``; None without a deadline."""
    if job.spec.deadline is None:
        return None
    needed = overhead_s + (work_hours / speed * 3600.0 if speed > 0 else math.inf)
    return (job.spec.deadline - now).total_seconds() - needed


def move_cost_usd(current: Offer, target: Offer, costs: MoveCosts, gb: float) -> float:
    """Dollars a make-before-break move burns: the replacement billed while
    it boots and while the job is down, the old instance while the job is
    down, and the bytes that cross regions."""
    replacement = target.price_per_hour * (costs.boot_s + costs.downtime_s) / 3600.0
    old = current.price_per_hour * costs.downtime_s / 3600.0
    return replacement + old + gb * costs.egress_per_gb(current, target)


def _later_weight(c: float, hold_h: float, x: float) -> float:
    """The weight of the prices after the current one over the first ``x``
    hours after it ends, in ``expected_price``: the k-th next price is
    ``c**k`` of the current one's distance from the mean, and prices change
    at random (a Poisson process) every ``hold_h`` hours on average, so the
    expected weight ``y`` hours on is ``c * exp(-(1 - c) * y / hold_h)``;
    this is its integral over [0, x]."""
    if x <= 0 or hold_h <= 0:
        return 0.0
    if c >= 1.0:
        return x
    rate = (1.0 - c) / hold_h
    return c * (1.0 - math.exp(-rate * x)) / rate


def expected_price(offer: Offer, now: datetime, start_h: float, hours: float) -> float:
    """The offer's expected mean price per hour over ``hours`` hours starting
    ``start_h`` hours after ``now``, from its recent price history.

    A price that has not changed lately (no ``price_history``) is taken to
    hold: the forecast is the current price, as it always was. One that
    keeps changing is forecast as the market has behaved in the last day:

    - the current price lasts as long as the recent ones on its side of the
      mean that lasted at least as long as it has so far (the empirical
      residual life; one that has outlasted them all is taken to hold);
    - later prices change at random (a Poisson process) as often as the
      recent ones did, each one's distance from the recent mean being the
      previous one's times the lag-one correlation of consecutive prices
      (an AR(1) process around the mean).

    So two offers whose prices swap every 15 minutes (correlation -1) are
    expected to swap back: the gap between them is worth what is left of
    the quarter hour less the half quarter hour the job then spends on the
    dearer one, on average, not the rest of the job. A spike (followed by
    the usual price, correlation near 0) reverts as fast as recent spikes
    did; a price that drifts and stays (correlation near 1) is taken to
    hold, as one that never changed.
    """
    price = offer.price_per_hour
    history = offer.price_history
    if history is None or not history.holds_s:
        return price
    mean = history.mean_price_per_hour
    age_s = max(0.0, (now - history.since).total_seconds())
    # The recent prices on the same side of the mean as this one (a dip
    # lasts as long as recent dips, not as the usual price), else all.
    side = [hold for hold, p in zip(history.holds_s, history.hold_prices, strict=False)
            if (p - mean) * (price - mean) > 0] or history.holds_s
    left_h = [(hold - age_s) / 3600.0 for hold in side if hold > age_s]
    if not left_h:
        return price
    start = max(0.0, start_h)
    end = start + max(0.0, hours)
    mean_hold_h = sum(history.holds_s) / len(history.holds_s) / 3600.0
    mean_left_h = sum(left_h) / len(left_h)
    c = max(-1.0, min(1.0, history.correlation))
    if hours <= 0:  # the expected price at ``start``
        weight = sum(left > start for left in left_h) / len(left_h)
        if start >= mean_left_h:
            weight += c * math.exp(-(1.0 - c) * (start - mean_left_h) / mean_hold_h)
    else:
        # The time in [start, end] the current price is expected to hold,
        # then the prices after it.
        current = sum(max(0.0, min(left, end) - start) for left in left_h) / len(left_h)
        later = (_later_weight(c, mean_hold_h, end - mean_left_h)
                 - _later_weight(c, mean_hold_h, start - mean_left_h))
        weight = (current + later) / hours
    return mean + (price - mean) * weight


def expected_cost_per_work_hour(offer: Offer, now: datetime, start_h: float,
                                work_h: float) -> float:
    """``cost_per_work_hour`` as ``expected_price`` forecasts it, over the
    hours ``work_h`` of work (at relative speed 1.0) takes on ``offer``
    starting ``start_h`` hours after ``now``."""
    speed = offer.relative_speed
    if speed <= 0:
        return offer.cost_per_work_hour
    return expected_price(offer, now, start_h, work_h / speed) / speed


@dataclass(frozen=True, slots=True)
class _Weighed:
    offer: Offer
    savings: float
    saving_usd: float
    cost_usd: float
    budget_ok: bool
    deadline_ok: bool
    slack_s: float | None
    stay_usd: float = 0.0  # the rest of the job where it is
    expected_usd: float = 0.0  # the rest with the move, its cost included

    @property
    def net(self) -> float:
        return self.saving_usd - self.cost_usd


def _weigh(job: Job, current: Offer, target: Offer, work: float, costs: MoveCosts,
           view: JobView, policy: MovePolicy, now: datetime) -> _Weighed:
    cur = current.cost_per_work_hour
    # The threshold compares the prices as they are now.
    savings = 1.0 - target.cost_per_work_hour / cur if cur > 0 else 0.0
    # The old instance keeps training while the replacement boots; the
    # saving starts after the switch (boot, then checkpoint and restore).
    after_boot = max(0.0, work - costs.boot_s / 3600.0 * current.relative_speed)
    switch_h = (costs.boot_s + costs.downtime_s) / 3600.0
    # What the rest costs either way, at the prices expected while it runs
    # (``expected_price``: the current ones for offers whose price has held,
    # reverting to the recent mean for prices that keep changing).
    stay = work * expected_cost_per_work_hour(current, now, 0.0, work)
    moved = ((work - after_boot)
             * expected_cost_per_work_hour(current, now, 0.0, work - after_boot)
             + after_boot * expected_cost_per_work_hour(target, now, switch_h, after_boot))
    saving_usd = stay - moved
    cost = move_cost_usd(current, target, costs, job.spec.dataset_size_gb + view.checkpoint_gb)
    # Budget: a move that lowers the projected total is always allowed (a
    # job over its budget overruns less by moving); one that raises it must
    # keep the total within the budget.
    expected = cost + moved
    budget_ok = budget_allows(budget_left(job), stay, expected)
    # Deadline: boot (still training), down for checkpoint + restore, then
    # the rest on the target; a spot target must leave room for one more
    # restart, or a preemption there would miss the deadline.
    slack = deadline_slack_s(job, now, after_boot, target.relative_speed,
                             costs.boot_s + costs.downtime_s)
    need = spot_reserve_s(policy, costs) if target.capacity == Capacity.SPOT else 0.0
    deadline_ok = slack is None or slack >= need
    return _Weighed(target, savings, saving_usd, cost, budget_ok, deadline_ok, slack,
                    stay, expected)


def weigh_move(job: Job, current: Offer, target: Offer, now: datetime, *,
               view: JobView | None = None, costs: MoveCosts | None = None,
               policy: MovePolicy | None = None) -> _Weighed:
    """One move's numbers (saving, cost, budget and deadline verdicts), as
    ``decide_move`` weighs it; for a move the user names."""
    view = view or JobView()
    current = offer_for(job.spec.resources, current)
    target = offer_for(job.spec.resources, target)
    work = remaining_work_hours(job, now, view, current.relative_speed)
    return _weigh(job, current, target, work, costs or MoveCosts(), view,
                  policy or MovePolicy(), now)


def _eligible_others(offers: Offers, job: Job, current: Offer, view: JobView) -> tuple[Offer, ...]:
    """The cheapest offers the job may move to (``eligible``: compatible,
    available, not spot in an avoided zone) other than the current one,
    cheapest per work hour first."""
    out: list[Offer] = []
    for o in offers.sorted_by_cost():
        if o.id == current.id or not eligible(o, job.spec.resources, view.avoid_zones):
            continue
        out.append(o)
        if len(out) >= _CANDIDATES:
            break
    return tuple(out)


# --- the decision: ordered rules ----------------------------------------------


def savings_threshold(job: Job, policy: MovePolicy) -> float:
    """The job's own threshold, else the policy's."""
    return (job.spec.savings_threshold if job.spec.savings_threshold is not None
            else policy.savings_threshold)


@dataclass(frozen=True, slots=True)
class MoveSituation:
    """What every move rule reads (``situation``): a running job on its
    current offer, the offers it may move to, and the numbers of staying.
    Offers are as the job sees them (``offers_for``: a job that asks for no
    GPU is priced by the hour)."""

    job: Job
    current: Offer
    # The eligible other offers, cheapest per work hour first (at most _CANDIDATES).
    candidates: tuple[Offer, ...]
    work_h: float  # remaining work, hours at relative speed 1.0
    slack_s: float | None  # deadline slack if it stays; None without a deadline
    threshold: float
    policy: MovePolicy
    costs: MoveCosts
    view: JobView
    now: datetime
    # How old the market data is (``stale_offers``); None: unknown or always current.
    offers_age_s: float | None = None

    def weigh(self, target: Offer) -> _Weighed:
        return _weigh(self.job, self.current, target, self.work_h, self.costs, self.view,
                      self.policy, self.now)

    def _numbers(self) -> dict[str, Any]:
        return {"decided_at": self.now, "threshold": self.threshold,
                "budget_left_usd": budget_left(self.job),
                "current_cost_per_work_hour": self.current.cost_per_work_hour,
                "remaining_work_hours": self.work_h, "deadline_slack_s": self.slack_s}

    def stay(self, reason: str, weighed: _Weighed | None = None) -> MoveDecision:
        """No move, with the numbers of the best move weighed, if any."""
        target: dict[str, Any] = {} if weighed is None else {
            "target": weighed.offer, "target_cost_per_work_hour": weighed.offer.cost_per_work_hour,
            "savings": weighed.savings, "expected_saving_usd": weighed.saving_usd,
            "move_cost_usd": weighed.cost_usd}
        return MoveDecision(job_id=self.job.id, move=False, reason=reason,
                            current_offer_id=self.current.id, **self._numbers(), **target)

    def go(self, weighed: _Weighed, trigger: str, reason: str) -> MoveDecision:
        return MoveDecision(
            job_id=self.job.id, move=True, reason=reason, current_offer_id=self.current.id,
            target=weighed.offer, target_cost_per_work_hour=weighed.offer.cost_per_work_hour,
            savings=weighed.savings, trigger=trigger, expected_saving_usd=weighed.saving_usd,
            move_cost_usd=weighed.cost_usd, **self._numbers())


def situation(job: Job, current: Offer, offers: Iterable[Offer], policy: MovePolicy,
              now: datetime, *, view: JobView | None = None, costs: MoveCosts | None = None,
              offers_age_s: float | None = None) -> MoveSituation:
    """What the rules read about ``job`` running on ``current`` among ``offers``."""
    view = view or JobView()
    current = offer_for(job.spec.resources, current)
    work = remaining_work_hours(job, now, view, current.relative_speed)
    return MoveSituation(
        job=job, current=current,
        candidates=_eligible_others(offers_for(job.spec.resources, offers), job, current, view),
        work_h=work, slack_s=deadline_slack_s(job, now, work, current.relative_speed),
        threshold=savings_threshold(job, policy), policy=policy, costs=costs or MoveCosts(),
        view=view, now=now, offers_age_s=offers_age_s)


def stale_offers(offers_age_s: float | None, policy: MovePolicy) -> str | None:
    """Why the market is too old to act on, or None (Karpenter's
    ``Synced()`` guard: no disruption on data that may no longer be true).
    An unknown age (a manual market: the table is the market) is never too old."""
    if offers_age_s is None or offers_age_s <= policy.max_offer_age_s:
        return None
    return (f"no move: offers are {offers_age_s:.0f} s old "
            f"(bound {policy.max_offer_age_s:.0f} s)")


def market_synced(s: MoveSituation) -> MoveDecision | None:
    """Offers older than ``MovePolicy.max_offer_age_s``: no move of
    any kind, and the decision says why."""
    stale = stale_offers(s.offers_age_s, s.policy)
    return None if stale is None else s.stay(stale)


def capacity_gone(s: MoveSituation) -> MoveDecision | None:
    """Forced: the current offer is no longer available (spot
    reclaimed). To the best offer that keeps the deadline (the most net
    saving); but a job with a deadline that is ahead of the uniform-progress
    line waits for spot rather than go to on-demand."""
    current = s.current
    if current.available:
        return None
    weighed = [s.weigh(o) for o in s.candidates]
    keeps = [w for w in weighed if w.deadline_ok]
    pick = min(keeps or weighed, key=lambda w: (-w.net, w.offer.id), default=None)
    if pick is None:
        return s.stay(f"{current.id} is no longer available and no other offer fits")
    if (s.job.spec.deadline is not None and pick.offer.capacity == Capacity.ON_DEMAND
            and s.slack_s is not None
            and s.slack_s >= s.costs.restart_s + wait_reserve_s(s.policy, s.costs)
            and not behind_uniform_progress(s.job, s.now, s.work_h, s.costs)):
        # Uniform Progress: on-demand only when the deadline needs it.
        return s.stay(f"{current.id} is no longer available; ahead of the uniform-progress "
                      "line, so waiting for spot rather than paying for on-demand", pick)
    return s.go(pick, Trigger.CAPACITY,
                f"{current.id} is no longer available; moving to {pick.offer.id} at "
                f"${pick.offer.cost_per_work_hour:.4f} per work hour")


def deadline_guard(s: MoveSituation) -> MoveDecision | None:
    """Forced: a spot job whose deadline slack no longer covers a
    preemption (``spot_reserve_s``) goes to the cheapest on-demand offer that
    keeps the deadline. If none does, staying is its best chance: the rule
    passes."""
    if not (s.current.capacity == Capacity.SPOT and s.slack_s is not None
            and s.slack_s < spot_reserve_s(s.policy, s.costs)):
        return None
    safe = [w for w in (s.weigh(o) for o in s.candidates if o.capacity == Capacity.ON_DEMAND)
            if w.deadline_ok]
    if not safe:
        return None
    pick = min(safe, key=lambda w: (w.offer.cost_per_work_hour, w.offer.id))
    return s.go(pick, Trigger.DEADLINE,
                f"deadline slack {s.slack_s / 3600:.2f}h no longer covers a spot "
                f"preemption (loss {s.costs.preemption_loss_s:.0f}s + margin "
                f"{margin_s(s.policy, s.costs):.0f}s): on-demand {pick.offer.id}")


def _held(s: MoveSituation) -> str | None:
    """Why price moves are held back now (the dwell since the last move, or
    the cap on price moves), or None."""
    policy, view = s.policy, s.view
    min_dwell = dwell_s(policy, view.price_moves)
    if s.job.last_migration_at is not None and min_dwell > 0:
        dwell = (s.now - s.job.last_migration_at).total_seconds()
        if dwell < min_dwell:
            return (f"moved {dwell:.0f}s ago, minimum dwell is {min_dwell:.0f}s "
                    f"after {view.price_moves} price moves")
    if policy.max_moves is not None and view.price_moves >= policy.max_moves:
        return f"already moved {view.price_moves} times for price, the cap is {policy.max_moves}"
    return None


def price_targets(s: MoveSituation) -> tuple[Offer, ...]:
    """The offers a price move may go to. The dwell and the cap hold back
    moves between offers (ping-pong); they do not keep a job on on-demand
    when spot is back: it went there because spot was gone, not for price,
    and Uniform Progress returns to spot as soon as it can."""
    if _held(s) is None:
        return s.candidates
    if s.current.capacity == Capacity.ON_DEMAND:
        return tuple(o for o in s.candidates if o.capacity == Capacity.SPOT)
    return ()


def held_back(s: MoveSituation) -> MoveDecision | None:
    """Within the dwell or at the cap, and no spot to return to: stay."""
    held = _held(s)
    return s.stay(held) if held is not None and not price_targets(s) else None


def within_limits(s: MoveSituation, paying: Sequence[_Weighed]) -> MoveDecision:
    """Budget and deadline, of the moves that pay: the one that nets the most among those
    that break neither the budget (``budget_allows``) nor the deadline (room
    for a preemption on spot), else stay and say which it would break."""
    allowed = [w for w in paying if w.budget_ok and w.deadline_ok]
    if not allowed:
        w = max(paying, key=lambda w: w.net)
        why = "the budget" if not w.budget_ok else "the deadline"
        return s.stay(f"moving to {w.offer.id} would break {why}", w)
    pick = max(allowed, key=lambda w: (w.net, -w.offer.cost_per_work_hour))
    return s.go(pick, Trigger.PRICE,
                f"{pick.offer.id} at ${pick.offer.cost_per_work_hour:.4f} per work hour is "
                f"{pick.savings:.1%} cheaper than {s.current.id} at "
                f"${s.current.cost_per_work_hour:.4f} (threshold {s.threshold:.0%}); saves "
                f"${pick.saving_usd:.4f} over {s.work_h:.2f} work hours for a "
                f"${pick.cost_usd:.4f} move")


def price_move(s: MoveSituation) -> MoveDecision:
    """Price, the last rule (it always decides): a target at least the threshold cheaper per
    work hour whose saving over the remaining work pays the move, within the
    budget and the deadline (``within_limits``); else stay and say why."""
    targets = price_targets(s)
    if not targets:
        return s.stay("no other available compatible offer")
    # Targets come cheapest per work hour first: when the cheapest is below
    # the threshold, so is every other (most passes end here).
    cheapest = s.weigh(targets[0])
    if cheapest.savings < s.threshold - _EPS:
        return s.stay(f"best offer {cheapest.offer.id} saves {cheapest.savings:.1%} per work "
                      f"hour, below the {s.threshold:.0%} threshold", cheapest)
    weighed = [cheapest, *(s.weigh(o) for o in targets[1:])]
    paying = [w for w in weighed if w.savings >= s.threshold - _EPS and w.net > _EPS]
    if not paying:
        forecast = (" at the prices expected from their recent changes"
                    if s.current.price_history or cheapest.offer.price_history else "")
        return s.stay(f"best offer {cheapest.offer.id} saves {cheapest.savings:.1%} per work "
                      f"hour, but ${cheapest.saving_usd:.4f} over the remaining "
                      f"{s.work_h:.2f} work hours{forecast} does not pay the "
                      f"${cheapest.cost_usd:.4f} move", cheapest)
    return within_limits(s, paying)


MoveRule = Callable[[MoveSituation], MoveDecision | None]
# Asked in order; the first that decides, decides (``price_move`` always does).
MOVE_RULES: tuple[MoveRule, ...] = (
    market_synced, capacity_gone, deadline_guard, held_back, price_move)


def decide_move(
    job: Job, current: Offer | None, offers: Iterable[Offer], policy: MovePolicy, now: datetime,
    *, view: JobView | None = None, costs: MoveCosts | None = None,
    offers_age_s: float | None = None,
) -> MoveDecision:
    """Decide for one job. ``current`` is the offer the job runs on;
    ``offers_age_s``: how old the market data is (None: unknown, or a market
    that is always current). The rules (``MOVE_RULES``) are asked in order."""
    if job.status != JobStatus.RUNNING or current is None:
        reason = (f"job is {job.status.value}, only running jobs move"
                  if job.status != JobStatus.RUNNING else "the job's current offer is unknown")
        return MoveDecision(job_id=job.id, move=False, reason=reason,
                            current_offer_id=current.id if current else None, decided_at=now,
                            threshold=savings_threshold(job, policy),
                            budget_left_usd=budget_left(job))
    s = situation(job, current, offers, policy, now, view=view, costs=costs,
                  offers_age_s=offers_age_s)
    for rule in MOVE_RULES:
        decision = rule(s)
        if decision is not None:
            return decision
    raise AssertionError("price_move always decides")


def plan_moves(
    jobs: Iterable[Job], offers: Iterable[Offer], policy: MovePolicy, now: datetime,
    *, views: Mapping[str, JobView] | None = None, costs: MoveCosts | None = None,
) -> list[MoveDecision]:
    """One scout pass: a decision for every running job (offers ranked once,
    and once more as jobs that ask for no GPU see them)."""
    ranked = Offers(offers).ranked()
    by_id = {o.id: o for o in ranked}
    views = views or {}
    cpu_ranked: Offers | None = None

    def seen_by(job: Job) -> Offers:
        nonlocal cpu_ranked
        if job.spec.resources.asks_for_gpu:
            return ranked
        if cpu_ranked is None:
            cpu_ranked = offers_for(job.spec.resources, ranked).ranked()
        return cpu_ranked

    return [
        decide_move(job, by_id.get(job.offer_id or ""), seen_by(job), policy, now,
                    view=views.get(job.id), costs=costs)
        for job in jobs
        if job.status == JobStatus.RUNNING
    ]
