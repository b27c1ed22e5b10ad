"""The small library a training script uses; see ``runtime`` for the contract.

    from gpuscout import workload
    run = workload.init(checkpoint_every=10, default_dir=out_dir)
    restored = run.restore()            # (step, state) or None
    for step in range(start + 1, total + 1):
        ...
        run.step_done(step, loss=loss, total_steps=total, state=lambda: {...})
    run.save_artifact("model.json", data)
"""

from gpuscout.workload.runtime import (
    AgentUnavailable,
    BadRequest,
    Request,
    Run,
    decode_state,
    encode_state,
    init,
)

__all__ = [
    "AgentUnavailable", "BadRequest", "Request", "Run", "decode_state", "encode_state", "init",
]
