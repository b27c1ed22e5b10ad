"""The demo of `make run`: a real training job that the scout moves.

The demo market replays ``market/data/demo_trace.csv`` in real time: at the
start no g4dn.xlarge spot capacity is available in any zone (capacity comes
and goes, as the availability traces in shared/traces show), so the job
starts on the best available offer, p3.2xlarge spot ($0.918/h, $0.918 per
V100-hour of work). 45 seconds in, g4dn.xlarge spot capacity returns in
us-east-1b ($0.1578/h at half a V100's speed: $0.316 per work hour, 66%
cheaper), and the next scout pass (every 15 s in the demo) moves the job
there, live. Prices are the 2021 us-east-1 list and spot prices.
"""

from __future__ import annotations

from pathlib import Path

from gpuscout.config import Settings
from gpuscout.domain import JobSpec, Resources, WorkloadType

DEMO_TRACE = Path(__file__).parent / "market" / "data" / "demo_trace.csv"
DEMO_SCOUT_INTERVAL_S = 15.0
DEMO_STEPS = 2400
DEMO_STEP_SLEEP_S = 0.1


def demo_settings(settings: Settings) -> Settings:
    """The settings with the demo market and a short scout interval, unless
    the user chose a market or an interval explicitly."""
    changes: dict[str, object] = {}
    if "market" not in settings.model_fields_set:
        changes["market"] = f"trace:{DEMO_TRACE}@1"
    if "scout_interval_s" not in settings.model_fields_set:
        changes["scout_interval_s"] = DEMO_SCOUT_INTERVAL_S
    return settings.model_copy(update=changes)


def demo_job_spec(steps: int = DEMO_STEPS, step_sleep_s: float = DEMO_STEP_SLEEP_S) -> JobSpec:
    return JobSpec(
        name="demo-linreg",
        model="linear-regression",
        dataset_size_gb=0.001,
        workload_type=WorkloadType.TRAINING,
        expected_duration_hours=steps * step_sleep_s / 3600,
        budget_usd=5.0,
        resources=Resources(gpus=1, cpus=1, memory_gb=1),
        # Plain `python`: the job's PATH starts with the Python environment
        # GPU Scout runs in, on every instance.
        command=(
            f"python -m gpuscout.examples.linreg --steps {steps} "
            f"--step-sleep {step_sleep_s} --seed 7"
        ),
    )
