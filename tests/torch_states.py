"""Shared by the tests that check a moved training run ends bit for bit
where an uninterrupted one does (torch_digits, lightning_digits, hf_digits):
comparing saved states, and moving a run between two real agents."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch


def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested state (dicts, lists, tuples) as {"a.b.0": leaf}."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(leaves(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list | tuple):
        return leaves(dict(enumerate(value)), prefix)
    return {prefix.rstrip("."): value}


def assert_identical(got: Any, want: Any) -> int:
    """Every tensor equal (torch.equal, same dtype), every other value equal;
    returns how many tensors were compared (the caller checks the count)."""
    flat_got, flat_want = leaves(got), leaves(want)
    assert flat_got.keys() == flat_want.keys()
    tensors = 0
    for key, expected in flat_want.items():
        actual = flat_got[key]
        if isinstance(expected, torch.Tensor):
            assert isinstance(actual, torch.Tensor), key
            assert actual.dtype == expected.dtype and torch.equal(actual, expected), key
            tensors += 1
        else:
            assert actual == expected, key
    return tensors


def load_model(data: bytes) -> dict[str, Any]:
    """The ``model.pt`` an example writes (torch.save of a dict)."""
    return dict(torch.load(io.BytesIO(data), weights_only=True))


def move_between_agents(start_agent: Callable[..., Any], command: str, *,
                        min_step: int = 30, steps: int) -> tuple[Any, Any, int]:
    """Run ``command`` on an agent, move it at a step >= ``min_step`` to a
    standby replacement (checkpoint with pause, restore that step), and wait
    for the replacement's first step. Returns (old, new, checkpoint step)."""
    old = start_agent(command, instance_id="i-old")
    new = start_agent(command, instance_id="i-new", standby=True)
    old.wait(lambda h: h["state"] == "running" and h["step"] >= min_step,
             "old instance training", timeout=60)
    assert new.health()["state"] == "standby"
    answer = old.call("POST", "/agent/checkpoint", json={"pause": True, "timeout_s": 20})
    assert answer.status_code == 200, answer.text
    step = answer.json()["step"]
    assert min_step <= step < steps
    assert new.call("POST", "/agent/restore", json={"step": step}).status_code == 202
    health = new.wait(lambda h: h["state"] == "running" and h["step"] > step,
                      "replacement's first step", timeout=60)
    assert health["first_step"] == step + 1
    assert old.health()["step"] == step  # the old side never ran past the checkpoint
    return old, new, step
