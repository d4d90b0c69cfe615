"""ViCuR's cue-recovery module (VICUR.md section 2): sink-token cross-attention to the image tokens during prefill.

After every decoder layer whose index is a multiple of the interval `s` (0, s, 2s, ...), the sequence's first token
(the sink: for Qwen chat templates the first `<|im_start|>`) gathers evidence from the row's image (and video)
placeholder tokens:

    q = W_q RMSNorm_q(h_sink);  k = W_k RMSNorm_kv(h_vis);  v = W_v RMSNorm_kv(h_vis)
    h_sink <- h_sink + W_o MultiHeadAttention(q, k, v)          (scale (d / H)^-0.5)

Only the sink row changes. It runs when a forward holds the sequence start and its visual tokens (the prefill, with
or without a KV cache being filled); a forward that continues a cache (decoding, or completions run on a shared prompt)
is unchanged. `W_o` starts at zero, so attaching the module leaves the model's function unchanged until it trains.

The module lives inside the model (`<backbone>.language_model.cue_recovery`), so the optimizer, DDP and ZeRO-3 see
its parameters and `save_pretrained` writes them; `model.config.cue_recovery` records where it goes.
`load_with_cue_recovery` is the matching load path, and `cue_recovery_modules_to_save` keeps it trainable (and saved)
next to a PEFT adapter.
"""

from __future__ import annotations

import json
import os
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F


__all__ = [
    "CUE_RECOVERY_FAMILIES",
    "CueRecoveryAttention",
    "add_cue_recovery",
    "cue_recovery_modules_to_save",
    "has_cue_recovery",
    "load_with_cue_recovery",
]

#: Model types whose image (and video) placeholder tokens are known from their config
CUE_RECOVERY_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "llava")
_ATTRIBUTE = "cue_recovery"


class CueRecoveryAttention(nn.Module):
    """One sink-token cross-attention block: 4 `d x d` bias-free maps and two RMSNorms (`2 d` more parameters)."""

    def __init__(self, hidden_size: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}.")
        self.num_heads = num_heads
        self.norm_q = nn.RMSNorm(hidden_size, eps=eps)
        self.norm_kv = nn.RMSNorm(hidden_size, eps=eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.o_proj.weight)  # the identity at attachment

    def forward(self, sink: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        """The updated sink states.

        Args:
            sink: `(B, d)` hidden states of each row's sink token.
            visual: `(B, n, d)` hidden states of each row's visual tokens, right-padded to `n`.
            visual_mask: `(B, n)` true on real visual tokens; every row has at least one.
        """
        batch, n, width = visual.shape
        head_dim = width // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)

        q = heads(self.q_proj(self.norm_q(sink)).unsqueeze(1))
        kv = self.norm_kv(visual)
        k, v = heads(self.k_proj(kv)), heads(self.v_proj(kv))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visual_mask[:, None, None, :])  # scale hd^-0.5
        return sink + self.o_proj(attended.transpose(1, 2).reshape(batch, width))


def _backbone(model: nn.Module) -> nn.Module:
    if isinstance(model, PeftModel):
        model = model.base_model.model
    return model.base_model


def has_cue_recovery(model: nn.Module) -> bool:
    """Whether the model (or the model under a PEFT adapter) carries the cue-recovery module."""
    return hasattr(_backbone(model).language_model, _ATTRIBUTE)


class _SinkPositions:
    """Where the sink and the visual tokens of the current prefill are, handed from the backbone to its layers, and
    the hooks that run the modules.

    A backbone pre-hook reads them off `input_ids` (prefill only); the first layer that sees a forward's rotary
    embeddings files them under that tensor, and every layer of the same forward, gradient checkpointing's
    recomputation in the backward included, finds them there. The hooks are this object's methods, not closures, so
    that `copy.deepcopy` of the model copies them with it: a copy's hooks then run the copy's modules.
    """

    def __init__(self, visual_token_ids: tuple[int, ...], container: nn.ModuleList):
        self.visual_token_ids = visual_token_ids
        self.container = container
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # id(rotary embedding tensor) -> (a weak reference to it, the positions of its forward)
        self.by_forward: dict[int, tuple[weakref.ref, Any]] = {}

    def backbone_pre_hook(self, module, args, kwargs) -> None:
        self.by_forward = {k: v for k, v in self.by_forward.items() if v[0]() is not None}
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            self.pending = None  # a continuation: the sink and the image are in the cache, not in this input
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(
                "The cue-recovery module finds the sink and the image tokens in `input_ids`; this prefill passed "
                "`inputs_embeds` only. Pass `input_ids`."
            )
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        # Rows are left-padded: the sink is each row's first attended position
        sink = (
            mask.long().argmax(dim=1) if mask is not None and mask.dim() == 2 else input_ids.new_zeros(len(input_ids))
        )
        visual = torch.isin(input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device))
        self.pending = (sink, visual, visual.any(dim=1))

    def backbone_post_hook(self, module, args, kwargs, output) -> None:
        self.pending = None

    def of_layer_call(self, kwargs: dict[str, Any]):
        key = kwargs["position_embeddings"][0]
        entry = self.by_forward.get(id(key))
        if entry is None or entry[0]() is not key:
            entry = self.by_forward[id(key)] = (weakref.ref(key), self.pending)
        return entry[1]

    def layer_hook(self, index: int, layer, args, kwargs, output):
        """After a chosen decoder layer: its `index`-th module updates each row's sink from the row's visual tokens."""
        found = self.of_layer_call(kwargs)
        if found is None:
            return output
        sink, visual, has_visual = found
        hidden = output[0] if isinstance(output, tuple) else output
        rows = has_visual.nonzero().flatten()
        if rows.numel() == 0:
            return output
        counts = visual[rows].sum(dim=1)
        width = int(counts.max())
        # Each row's visual tokens, right-padded: position j of row r is its j-th visual token
        slots = torch.arange(width, device=hidden.device).expand(len(rows), -1)
        visual_mask = slots < counts[:, None]
        order = torch.sort((~visual[rows]).long(), dim=1, stable=True).indices[:, :width]
        gathered = hidden[rows[:, None], order]
        updated = self.container[index](hidden[rows, sink[rows]], gathered, visual_mask)
        hidden = hidden.index_put((rows, sink[rows]), updated.to(hidden.dtype))  # out of place: autograd-safe
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _attach(model: nn.Module, interval: int) -> None:
    """Create the modules (if absent) and the hooks that run them."""
    model_type = model.config.model_type
    if model_type not in CUE_RECOVERY_FAMILIES:
        raise ValueError(
            f"The cue-recovery module needs the positions of the image tokens, known here for "
            f"{', '.join(CUE_RECOVERY_FAMILIES)}; got a {model_type!r} model. Train without it (cue_recovery=False)."
        )
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}.")
    backbone = _backbone(model)
    language_model = backbone.language_model
    text = model.config.get_text_config()
    layers = list(range(0, len(language_model.layers), interval))
    if not hasattr(language_model, _ATTRIBUTE):
        reference = language_model.layers[0].input_layernorm.weight
        modules = nn.ModuleList(
            CueRecoveryAttention(text.hidden_size, text.num_attention_heads, getattr(text, "rms_norm_eps", 1e-6))
            for _ in layers
        ).to(device=reference.device, dtype=reference.dtype)
        setattr(language_model, _ATTRIBUTE, modules)
    container = getattr(language_model, _ATTRIBUTE)
    visual_ids = tuple(
        int(i)
        for i in (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
        if i is not None
    )
    positions = _SinkPositions(visual_ids, container)
    backbone.register_forward_pre_hook(positions.backbone_pre_hook, with_kwargs=True)
    backbone.register_forward_hook(positions.backbone_post_hook, with_kwargs=True)
    for j, layer_index in enumerate(layers):
        language_model.layers[layer_index].register_forward_hook(partial(positions.layer_hook, j), with_kwargs=True)
    model.config.cue_recovery = {"interval": interval, "layers": layers}


def add_cue_recovery(model: nn.Module, interval: int = 5) -> nn.Module:
    """Attach the cue-recovery module to a Qwen3-VL, Qwen2.5-VL or LLaVA model (in place) and return the model.

    One `CueRecoveryAttention` after every decoder layer whose index is a multiple of `interval` (6 for Qwen3-VL-2B's
    28 layers: 4 d^2 + 2 d parameters each, d = 2048: 100.7M and 24.6K). Its output projection starts at zero. A model
    that already has the module is returned unchanged.
    """
    if has_cue_recovery(model):
        return model
    _attach(model, interval)
    return model


def cue_recovery_modules_to_save(model: nn.Module) -> list[str]:
    """Module names to add to a PEFT config's `modules_to_save`, so the module trains and is saved with the adapter."""
    backbone = _backbone(model)
    prefix = next(name for name, module in model.named_modules() if module is backbone.language_model)
    return [f"{prefix}.{_ATTRIBUTE}.{j}" for j in range(len(getattr(backbone.language_model, _ATTRIBUTE)))]


def _checkpoint_tensors(name_or_path: str | os.PathLike, prefix: str, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors of a `save_pretrained` checkpoint (local or on the Hub; one file or indexed shards) whose names hold
    `prefix`."""
    from transformers.utils import cached_file

    def resolve(filename: str) -> str | None:
        local = Path(name_or_path) / filename
        if local.is_file():
            return str(local)
        return cached_file(str(name_or_path), filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    index = resolve("model.safetensors.index.json")
    files = sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if index else ["model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(resolve(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if prefix in k})
    return tensors


def load_with_cue_recovery(name_or_path: str | os.PathLike, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a student saved with the cue-recovery module: the model, the module it records in its config, its weights.

    `AutoModelForImageTextToText.from_pretrained` alone drops the module's weights (they are not in the architecture);
    this attaches the module where `config.cue_recovery` says, then loads them from the same checkpoint. A checkpoint
    without the module loads as a plain model.
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **from_pretrained_kwargs)
    settings = getattr(model.config, "cue_recovery", None)
    if not settings:
        return model
    _attach(model, settings["interval"])
    container = getattr(_backbone(model).language_model, _ATTRIBUTE)
    hub = {k: from_pretrained_kwargs[k] for k in ("revision", "cache_dir", "token") if k in from_pretrained_kwargs}
    tensors = _checkpoint_tensors(name_or_path, f".{_ATTRIBUTE}.", **hub)
    state = {name.split(f".{_ATTRIBUTE}.", 1)[1]: value for name, value in tensors.items()}
    container.load_state_dict(state)
    return model
