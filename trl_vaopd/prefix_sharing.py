"""Prefix-shared forward passes: the K sibling rollouts of a prompt run their shared prompt once.

Siblings share their prompt token for token, image included (Qwen3-VL turns one image into 256 to 4096 tokens at the
papers' pixel budget). Instead of running `prompt + completion` for every rollout, the prompt of each group runs once
with `use_cache=True`, its KV cache is repeated to the group's rollouts, and the completions run on top with the
positions they would have had in the full sequence. A model pass then processes `P / K + C` token positions per
rollout instead of `P + C`, with the same hidden states up to float rounding (tested against the full passes).

That holds when each call holds whole sibling groups: a group cut into pieces runs its prompt once per piece.
`call_slices` cuts a batch into calls of a given size along its groups, so a group is cut only when it is larger than a
call (or when the batch starts or ends inside a group, as a process's share of the generation batch may).

Exact for the families whose positions this module can continue (`trl_vaopd.families.FAMILIES`): the Qwen-VL
families, Qwen3.5 and GLM-4V (multimodal RoPE: the completion's text positions continue from the prompt's largest
position) and the others (1-D positions continue from the cache length; RoPE sees the same relative positions).
Qwen3.5's linear-attention layers cache a convolution and a recurrent state instead of keys and values; they are
repeated to the rollouts the same way.
`prefix_sharing_support` says why any other setting falls back to full passes.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from .families import FAMILIES, family_of


__all__ = [
    "PREFIX_SHARING_FAMILIES",
    "PrefixGroups",
    "cache_keyword",
    "call_slices",
    "prefix_groups",
    "prefix_sharing_support",
    "shared_prefix_hidden_states",
]

#: Model types whose completion positions continue exactly after a cached prompt (`trl_vaopd.families`)
PREFIX_SHARING_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.prefix_sharing)
# Model inputs a shared prompt may carry: per-rollout entries (after `split_pixel_values_by_grid`; LLaVA-NeXT's tiles
# follow its `image_sizes`, Gemma 4's patches their `image_position_ids`) and per-token types
_PER_ROLLOUT_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "image_position_ids")
_PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The multimodal backbone TRL's trainers call (vision injection included, no output head)."""
    # An isinstance check: accelerate's `is_peft_model` unwraps the model first and costs milliseconds per call
    if isinstance(model, PeftModel):
        model = model.base_model.model
    return model.base_model


def cache_keyword(module: torch.nn.Module) -> str:
    """The name under which `module` takes its KV cache, and its output returns it: `"cache"` from transformers 5.25,
    which deprecates `"past_key_values"` (removal planned for 5.40), `"past_key_values"` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def prefix_sharing_support(model: torch.nn.Module, gradient_checkpointing: bool = False) -> str | None:
    """`None` when the model's passes can share their prompts exactly, else the reason they cannot."""
    family = family_of(model)
    if family is None or not family.prefix_sharing:
        return f"{model.config.model_type} is not among the families whose positions continue after a cached prompt"
    if gradient_checkpointing:
        return "gradient checkpointing runs the student without a KV cache in transformers"
    return None


@dataclass(frozen=True)
class PrefixGroups:
    """Which rollouts share a prompt: `index[i]` is rollout i's group, `first[g]` a rollout holding group g's prompt."""

    index: torch.Tensor
    first: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.first.numel()

    @property
    def sizes(self) -> list[int]:
        """Rollouts per group, in batch order."""
        return torch.bincount(self.index, minlength=self.num_groups).tolist()


def _same_prompt(rows: dict[str, Any], i: int, j: int) -> bool:
    if not torch.equal(rows["prompt_ids"][i], rows["prompt_ids"][j]):
        return False
    if not torch.equal(rows["prompt_mask"][i], rows["prompt_mask"][j]):
        return False
    return all(torch.equal(rows[key][i], rows[key][j]) for key in _PER_ROLLOUT_KEYS if key in rows)


def prefix_groups(rows: dict[str, Any]) -> PrefixGroups:
    """Groups of consecutive rollouts with the same prompt: the same ids and mask and, per rollout, the same images.

    Siblings sit next to each other in the generation batch and, with sibling-preserving micro-batches, in every
    micro-batch; comparing neighbours only costs one pass over the rows.

    Args:
        rows: rollouts with `prompt_ids`, `prompt_mask` and per-rollout image entries (`split_pixel_values_by_grid`).
    """
    n = rows["prompt_ids"].size(0)
    starts = [0] + [i for i in range(1, n) if not _same_prompt(rows, i - 1, i)]
    index = torch.zeros(n, dtype=torch.long)
    for g, start in enumerate(starts):
        index[start:] = g
    device = rows["prompt_ids"].device
    return PrefixGroups(index=index.to(device), first=torch.tensor(starts, device=device))


def call_slices(sizes: list[int], max_rows: int) -> list[slice]:
    """Consecutive calls of at most `max_rows` rows over a batch of consecutive groups of `sizes` rows, cut only
    between groups: whole groups share a call while they fit, so each group's prompt runs once.

    A group of more than `max_rows` rows is cut into pieces of `max_rows` rows (and one of the remainder, which may
    share a call with the next group): each piece runs the prompt once, `ceil(size / max_rows)` prompt passes in all.
    """
    if max_rows < 1:
        raise ValueError(f"A call needs room for at least one row, got max_rows={max_rows}.")
    calls, start, end = [], 0, 0
    for size in sizes:
        pieces = [max_rows] * (size // max_rows) + ([size % max_rows] if size % max_rows else [])
        for piece in pieces:
            if end + piece - start > max_rows:
                calls.append(slice(start, end))
                start = end
            end += piece
    if end > start:
        calls.append(slice(start, end))
    return calls


def _completion_positions(backbone: torch.nn.Module, prompt: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """`(3, G, length)` multimodal-RoPE positions of completion tokens after each prompt, as the full sequence has them.

    With images, the prompt's positions come from `get_rope_index` (padding skipped) and the completion's text
    positions continue from the largest one, on all three axes. A text-only prompt ran on plain positions `0..P-1`
    (padding included), which the completion continues from `P`. Explicit either way: a Qwen model would otherwise
    continue from the `rope_deltas` its last multimodal forward left behind.
    """
    if "image_grid_thw" in prompt:
        positions, _ = backbone.get_rope_index(
            prompt["input_ids"],
            mm_token_type_ids=prompt["mm_token_type_ids"],
            image_grid_thw=prompt["image_grid_thw"],
            attention_mask=prompt["attention_mask"],
        )
        attended = prompt["attention_mask"].bool().unsqueeze(0).expand_as(positions)
        start = torch.where(attended, positions, torch.zeros_like(positions)).amax(dim=(0, 2)) + 1
    else:
        start = torch.full(
            (prompt["input_ids"].size(0),), prompt["input_ids"].size(1), device=prompt["input_ids"].device
        )
    steps = torch.arange(length, device=start.device)
    return (start[:, None] + steps).unsqueeze(0).expand(3, -1, -1)


def _recurrent_states(cache: Any) -> list[torch.Tensor]:
    """The recurrent states a cache holds for its linear-attention layers (Qwen3.5's gated delta nets), `[]` for a
    cache of keys and values only."""
    return [
        state
        for layer in cache.layers
        for state in (getattr(layer, "recurrent_states", None) or {}).values()  # by state index
        if isinstance(state, torch.Tensor)
    ]


def _saved_as_copies(states: list[torch.Tensor]) -> Any:
    """Autograd saves the tensors in `states` as copies: a linear-attention layer reads its recurrent state, then
    overwrites it in place with the continuation's, which would corrupt the saved read before the backward runs."""
    if not states:
        return contextlib.nullcontext()
    pointers = {state.data_ptr() for state in states}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().clone() if tensor.data_ptr() in pointers else tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def shared_prefix_hidden_states(model: torch.nn.Module, rows: dict[str, Any], groups: PrefixGroups) -> torch.Tensor:
    """Last hidden states `(N, C, H)` aligned to the completion tokens of `rows`, each group's prompt run once.

    Args:
        model: the (unwrapped) model; its backbone runs twice, on the groups' prompts, then on every completion.
        rows: rollouts with `prompt_ids`, `prompt_mask`, `completion_ids`, `completion_mask`, and their multimodal
            inputs with images per rollout (`split_pixel_values_by_grid`) and per-token types over prompt and
            completion.
        groups: which rollouts share a prompt (`prefix_groups`).

    Returns:
        Position t of rollout i is the hidden state that predicts its completion token t, as in the full pass.
    """
    backbone = backbone_of(model)
    first, index = groups.first, groups.index
    prompt_len = rows["prompt_ids"].size(1)
    prompt = {"input_ids": rows["prompt_ids"][first], "attention_mask": rows["prompt_mask"][first]}
    for key in _PER_ROLLOUT_KEYS:
        if key in rows:
            prompt[key] = torch.cat([rows[key][i] for i in first.tolist()])
    for key in _PER_TOKEN_KEYS:
        if key in rows:
            prompt[key] = rows[key][first, :prompt_len]
    out = backbone(**prompt, use_cache=True)
    keyword = cache_keyword(backbone)
    cache = getattr(out, keyword)
    # Every rollout continues its group's prompt: the cache is gathered along the batch (with gradient, if any).
    # `reorder_cache` gathers every layer kind's states (keys and values, and the convolution and recurrent states of
    # linear-attention layers such as Qwen3.5's gated delta nets), where `batch_select_indices` misses the latter
    cache.reorder_cache(index)
    completion = rows["completion_ids"]
    continuation = {
        "input_ids": completion,
        "attention_mask": torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1),
        keyword: cache,
        "use_cache": True,
    }
    if family_of(model).positions == "mrope":
        continuation["position_ids"] = _completion_positions(backbone, prompt, completion.size(1))[:, index]
    with _saved_as_copies(_recurrent_states(cache)):
        hidden = backbone(**continuation).last_hidden_state
    # The prompt's last position predicts the first completion token; completion position t predicts token t + 1
    return torch.cat([out.last_hidden_state[index, -1:], hidden[:, :-1]], dim=1)
