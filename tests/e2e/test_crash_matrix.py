"""The crash matrix, one kill per phase: `gpuscout up` SIGKILLed in each of a
move's six phases and restarted on the same home finishes or undoes the move,
and the job completes with the exact model, loses no step beyond the
checkpoint in flight, runs on exactly one instance afterwards and leaves no
process or live instance record behind.

The runs and their checks are bench/crash_matrix.py's (``run_case``), which
also runs the full matrix (three kills per phase, at every kill point).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.crash_matrix import KILL_POINTS, PHASES, Config, reference_model, render, run_case

pytestmark = pytest.mark.e2e

# Short enough for `make test` on two cores (about 25 s a phase), long enough
# that the job still trains when the plane is killed and after its restart.
CONFIG = Config(steps=800, step_sleep_s=0.02, boot_delay_s=1.5, dead_s=0.5, timeout_s=90)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return reference_model(tmp_path_factory.mktemp("reference"), CONFIG)


@pytest.mark.parametrize("phase", PHASES)
def test_a_plane_killed_in_each_phase_of_a_move_recovers_on_restart(
        phase: str, reference: bytes, tmp_path: Path) -> None:
    result = run_case(phase, KILL_POINTS[phase][0], CONFIG, tmp_path, reference)
    assert result.ok, render([result], 1)
    assert result.killed_in == phase
    expected = "rolled forward" if phase in ("switching", "terminating") else "rolled back"
    assert result.outcome == expected
    assert result.lost_steps == 0
    assert result.orphans == []
