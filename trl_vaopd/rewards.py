"""Verifiable rewards for distillation mixed with GRPO: the reward functions a trainer takes, and their values.

Reward functions have TRL's signature, `(prompts, completions, completion_ids, **dataset_columns) -> list[float |
None]`, so the same function serves `trl.GRPOTrainer` and `VAOPDTrainer`; `None` means "not applicable to this
rollout", as in TRL. `"accuracy"` names `trl_vaopd.evaluation.accuracy_reward` (math-verify, the last committed
answer, against the `answer` column).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .evaluation import accuracy_reward


__all__ = ["REWARD_FUNCS", "compute_rewards", "resolve_reward_funcs"]

#: Reward functions by the names the command line and `reward_funcs=` accept.
REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {"accuracy": accuracy_reward}


def _name_of(func: Callable) -> str:
    return getattr(func, "__name__", None) or getattr(getattr(func, "func", None), "__name__", type(func).__name__)


def resolve_reward_funcs(
    reward_funcs: Callable | str | Sequence[Callable | str] | None,
) -> tuple[list[Callable], list[str]]:
    """The reward functions as a list, names (`REWARD_FUNCS`) resolved, and the name each is logged under."""
    if reward_funcs is None:
        return [], []
    funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
    resolved = []
    for func in funcs:
        if isinstance(func, str):
            if func not in REWARD_FUNCS:
                close = difflib.get_close_matches(func, REWARD_FUNCS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"Unknown reward function {func!r}: the names known are {', '.join(REWARD_FUNCS)}.{hint} Reward "
                    "models by hub name are not supported; pass a callable with TRL's reward signature instead."
                )
            func = REWARD_FUNCS[func]
        if not callable(func):
            raise TypeError(f"reward_funcs holds {type(func).__name__}; pass callables with TRL's reward signature.")
        resolved.append(func)
    return resolved, [_name_of(f) for f in resolved]


def compute_rewards(
    funcs: Sequence[Callable],
    names: Sequence[str],
    inputs: Sequence[dict[str, Any]],
    completions: Sequence[Any],
    completion_ids: Sequence[list[int]],
    **extra: Any,
) -> torch.Tensor:
    """`(N, F)` rewards of `N` rollouts under `F` functions, `NaN` where a function returned `None`.

    Each function is called as TRL calls it: `prompts=`, `completions=`, `completion_ids=`, every other dataset
    column of `inputs` by name, and `extra` (`trainer_state`). A function that returns another number of values than
    rollouts, or a NaN (rather than `None`), is refused by name.
    """
    columns = {
        key: [row[key] for row in inputs] for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")
    }
    prompts = [row["prompt"] for row in inputs]
    out = torch.empty(len(inputs), len(funcs), dtype=torch.float64)
    for j, (func, name) in enumerate(zip(funcs, names, strict=True)):
        values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **extra)
        values = list(values) if values is not None else []
        if len(values) != len(inputs):
            raise ValueError(
                f"The reward function {name!r} returned {len(values)} values for {len(inputs)} completions; it must "
                "return one float (or None, for 'not applicable') per completion."
            )
        nans = [i for i, v in enumerate(values) if v is not None and math.isnan(float(v))]
        if nans:
            raise ValueError(
                f"The reward function {name!r} returned NaN for {len(nans)} completion(s) (first indices in the "
                f"batch: {nans[:5]}). Return None for a completion the function does not apply to."
            )
        out[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
    return out
