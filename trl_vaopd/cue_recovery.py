"""ViCuR's cue-recovery module (docs/methods/vicur.md): sink-token cross-attention to the image tokens during prefill.

On the hidden states `h` that leave every decoder layer whose index is a multiple of the interval `s` (0, s, 2s, ...),
the sequence's first token (the sink: for Qwen chat templates the first `<|im_start|>`) gathers evidence from the
row's image (and video) placeholder tokens:

    q = W_q RMSNorm_q(h_sink);  k = W_k RMSNorm_kv(h_vis);  v = W_v RMSNorm_kv(h_vis)
    h_sink <- h_sink + W_o MultiHeadAttention(q, k, v)          (scale (d / H)^-0.5)

with one `RMSNorm_q`, `RMSNorm_kv` pair shared by every module layer, as in the authors' `StudentQwen3VLTextModel`.
"Leave" means after everything the model adds to them at that layer (Qwen3-VL's DeepStack features included): the
update runs on the input of the next decoder layer, or of the final norm after the last layer, whatever the family
does in between. Only the sink row changes. It runs when a forward holds the sequence start and its visual tokens
(the prefill, with or without a KV cache being filled); a forward that continues a non-empty cache, however the cache
is passed (`past_key_values=` or `cache=`), is unchanged. `W_o` starts at zero, so attaching the module leaves the
model's function unchanged until it trains (the authors start it at PyTorch's default).

The module lives inside the model under the authors' names (`<backbone>.language_model.sink_cross_attns.<layer>`,
`.sink_q_norm`, `.sink_kv_norm`; the text model is `text_model` on Idefics3 and SmolVLM, `trl_vaopd.families`), so the optimizer, DDP and ZeRO-3 see its parameters, `save_pretrained` writes them,
and checkpoints move between this package and the authors' code; `model.config.cue_recovery` records where it goes.
`load_with_cue_recovery` is the matching load path, and `cue_recovery_modules_to_save` keeps it trainable (and saved)
next to a PEFT adapter.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from .families import FAMILIES, family_of, text_model_of


__all__ = [
    "CUE_RECOVERY_FAMILIES",
    "CueRecoveryAttention",
    "add_cue_recovery",
    "continues_a_cache",
    "cue_recovery_modules_to_save",
    "has_cue_recovery",
    "load_with_cue_recovery",
]

#: Model types whose text model and image (and video) placeholder tokens are known (`trl_vaopd.families`)
CUE_RECOVERY_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.cue_recovery)
# The authors' parameter names, under the language model
_BLOCKS, _Q_NORM, _KV_NORM = "sink_cross_attns", "sink_q_norm", "sink_kv_norm"
_NAMES = re.compile(rf"(?:^|\.)({_BLOCKS}\.\d+\..+|{_Q_NORM}\..+|{_KV_NORM}\..+)$")


class CueRecoveryAttention(nn.Module):
    """One module layer's cross-attention: 4 `d x d` bias-free maps (the RMSNorms are shared by all layers)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}.")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.o_proj.weight)  # the identity at attachment

    def forward(self, query: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        """The sink's update `W_o MultiHeadAttention(W_q query, W_k visual, W_v visual)`, `(B, d)`.

        Args:
            query: `(B, d)` normalised hidden states of each row's sink token.
            visual: `(B, n, d)` normalised hidden states of each row's visual tokens, right-padded to `n`.
            visual_mask: `(B, n)` true on real visual tokens; every row has at least one.
        """
        batch, n, width = visual.shape
        head_dim = width // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)

        q = heads(self.q_proj(query).unsqueeze(1))
        k, v = heads(self.k_proj(visual)), heads(self.v_proj(visual))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visual_mask[:, None, None, :])  # scale hd^-0.5
        return self.o_proj(attended.transpose(1, 2).reshape(batch, width))


def _backbone(model: nn.Module) -> nn.Module:
    if isinstance(model, PeftModel):
        model = model.base_model.model
    return model.base_model


def _language_model(model: nn.Module) -> nn.Module | None:
    """The decoder stack the module attaches to, `None` for a family without the module."""
    family = family_of(model.base_model.model if isinstance(model, PeftModel) else model)
    return text_model_of(model) if family is not None and family.cue_recovery else None


def has_cue_recovery(model: nn.Module) -> bool:
    """Whether the model (or the model under a PEFT adapter) carries the cue-recovery module."""
    language_model = _language_model(model)
    return language_model is not None and hasattr(language_model, _BLOCKS)


def continues_a_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a call `module(*args, **kwargs)` continues a non-empty KV cache, passed by any name or position."""
    names = list(inspect.signature(module.forward).parameters)
    passed = {**dict(zip(names, args, strict=False)), **kwargs}
    return any(
        cache is not None and cache.get_seq_length() > 0
        for cache in (passed.get("cache"), passed.get("past_key_values"))
    )


class _SinkPositions:
    """Where the sink and the visual tokens of the current prefill are, handed from the backbone to its layers, and
    the hooks that run the module.

    A backbone pre-hook reads them off `input_ids` (prefill only). The update after layer `i` runs in a pre-hook of
    layer `i + 1` (or of the final norm): the first layer that sees a forward's rotary embeddings files the positions
    under that tensor, and every layer of the same forward, gradient checkpointing's recomputation in the backward
    included, finds them there. The hooks are this object's methods, not closures, so that `copy.deepcopy` of the
    model copies them with it: a copy's hooks then run the copy's module. The module's parts are looked up on the
    language model at each call, so the wrappers PEFT puts in their place (`modules_to_save`) run.
    """

    def __init__(self, visual_token_ids: tuple[int, ...], language_model: nn.Module):
        self.visual_token_ids = visual_token_ids
        self.language_model = language_model
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # id(rotary embedding tensor) -> (a weak reference to it, the positions of its forward)
        self.by_forward: dict[int, tuple[weakref.ref, Any]] = {}

    def backbone_pre_hook(self, module, args, kwargs) -> None:
        self.by_forward = {k: v for k, v in self.by_forward.items() if v[0]() is not None}
        if continues_a_cache(module, args, kwargs):
            self.pending = None  # the sink and the image are in the cache, not in this input
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

    def _of_layer_call(self, kwargs: dict[str, Any]):
        key = kwargs["position_embeddings"][0]
        entry = self.by_forward.get(id(key))
        if entry is None or entry[0]() is not key:
            entry = self.by_forward[id(key)] = (weakref.ref(key), self.pending)
        return entry[1]

    def _update(self, after_layer: int, hidden: torch.Tensor, found) -> torch.Tensor:
        """Each row's sink updated from the row's visual tokens by the module that follows layer `after_layer`."""
        if found is None:
            return hidden
        sink, visual, has_visual = found
        rows = has_visual.nonzero().flatten()
        if rows.numel() == 0:
            return hidden
        counts = visual[rows].sum(dim=1)
        width = int(counts.max())
        # Each row's visual tokens, right-padded: position j of row r is its j-th visual token
        slots = torch.arange(width, device=hidden.device).expand(len(rows), -1)
        visual_mask = slots < counts[:, None]
        order = torch.sort((~visual[rows]).long(), dim=1, stable=True).indices[:, :width]
        language_model = self.language_model
        sink_states = hidden[rows, sink[rows]]
        update = getattr(language_model, _BLOCKS)[str(after_layer)](
            getattr(language_model, _Q_NORM)(sink_states),
            getattr(language_model, _KV_NORM)(hidden[rows[:, None], order]),
            visual_mask,
        )
        # Out of place: autograd-safe
        return hidden.index_put((rows, sink[rows]), (sink_states + update).to(hidden.dtype))

    def layer_pre_hook(self, after_layer: int, layer, args, kwargs):
        """Before layer `after_layer + 1`: its input is what left layer `after_layer`, DeepStack's features included."""
        found = self._of_layer_call(kwargs)
        if args:
            return (self._update(after_layer, args[0], found), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._update(after_layer, kwargs["hidden_states"], found)}

    def norm_pre_hook(self, after_layer: int, norm, args):
        """Before the final norm, for a module after the last layer (the norm is never recomputed by checkpointing)."""
        return (self._update(after_layer, args[0], self.pending), *args[1:])


def _attach(model: nn.Module, interval: int) -> None:
    """Create the module (if absent) and the hooks that run it."""
    family = family_of(model)
    if family is None or not family.cue_recovery:
        raise ValueError(
            f"The cue-recovery module needs the decoder stack and the positions of the image tokens, known here for "
            f"{', '.join(CUE_RECOVERY_FAMILIES)}; got a {model.config.model_type!r} model. Train without it "
            "(cue_recovery=False)."
        )
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}.")
    backbone = _backbone(model)
    language_model = text_model_of(model)
    text = model.config.get_text_config()
    num_layers = len(language_model.layers)
    layers = list(range(0, num_layers, interval))
    if not hasattr(language_model, _BLOCKS):
        reference = language_model.layers[0].input_layernorm.weight
        # The model's own RMSNorm class, as the authors use Qwen3-VL's (it normalises in float32)
        norm = type(language_model.norm)
        eps = getattr(text, "rms_norm_eps", 1e-6)
        parts = {
            _BLOCKS: nn.ModuleDict(
                {str(i): CueRecoveryAttention(text.hidden_size, text.num_attention_heads) for i in layers}
            ),
            _Q_NORM: norm(text.hidden_size, eps=eps),
            _KV_NORM: norm(text.hidden_size, eps=eps),
        }
        for name, part in parts.items():
            setattr(language_model, name, part.to(device=reference.device, dtype=reference.dtype))
    visual_ids = tuple(
        int(i) for i in (getattr(model.config, key, None) for key in family.visual_token_keys) if i is not None
    )
    positions = _SinkPositions(visual_ids, language_model)
    backbone.register_forward_pre_hook(positions.backbone_pre_hook, with_kwargs=True)
    backbone.register_forward_hook(positions.backbone_post_hook, with_kwargs=True)
    for i in layers:
        if i + 1 < num_layers:
            language_model.layers[i + 1].register_forward_pre_hook(
                partial(positions.layer_pre_hook, i), with_kwargs=True
            )
        else:
            language_model.norm.register_forward_pre_hook(partial(positions.norm_pre_hook, i))
    model.config.cue_recovery = {"interval": interval, "layers": layers}


def add_cue_recovery(model: nn.Module, interval: int = 5) -> nn.Module:
    """Attach the cue-recovery module to a model of a family in `CUE_RECOVERY_FAMILIES` (in place); return the model.

    One `CueRecoveryAttention` after every decoder layer whose index is a multiple of `interval`, and one shared
    RMSNorm pair: on Qwen3-VL-2B's 28 layers (d = 2048), 6 x 4 d^2 + 2 d = 100,667,392 parameters. Its output
    projections start at zero. A model that already has the module is returned unchanged.
    """
    if has_cue_recovery(model):
        return model
    _attach(model, interval)
    return model


def cue_recovery_modules_to_save(model: nn.Module) -> list[str]:
    """Module names to add to a PEFT config's `modules_to_save`, so the module trains and is saved with the adapter."""
    language_model = _language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    blocks = [f"{prefix}.{_BLOCKS}.{i}" for i in getattr(language_model, _BLOCKS)]
    return [*blocks, f"{prefix}.{_Q_NORM}", f"{prefix}.{_KV_NORM}"]


def _checkpoint_tensors(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """The module's tensors in a `save_pretrained` checkpoint (local or on the Hub; one file or indexed shards), by
    their names under the language model (`sink_cross_attns.0.q_proj.weight`, `sink_q_norm.weight`, ...)."""
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
            for key in f.keys():
                if (match := _NAMES.search(key)) is not None:
                    tensors[match.group(1)] = f.get_tensor(key)
    return tensors


def _interval_of(tensors: dict[str, torch.Tensor], num_layers: int) -> int:
    """The interval of a checkpoint's module layers (the authors' checkpoints do not record it in their config)."""
    layers = sorted({int(name.split(".")[1]) for name in tensors if name.startswith(f"{_BLOCKS}.")})
    interval = layers[1] - layers[0] if len(layers) > 1 else num_layers
    if layers != list(range(0, num_layers, interval)):
        raise ValueError(
            f"The checkpoint's cue-recovery module follows layers {layers} of {num_layers}; expected every s-th layer "
            "from layer 0 (0, s, 2s, ...)."
        )
    return interval


def load_with_cue_recovery(name_or_path: str | os.PathLike, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a student saved with the cue-recovery module, by this package or by the authors' code.

    `AutoModelForImageTextToText.from_pretrained` alone drops the module's weights (they are not in the architecture);
    this attaches the module where the checkpoint's weights (or `config.cue_recovery`) say, then loads them from the
    same checkpoint. A checkpoint without the module loads as a plain model.
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **from_pretrained_kwargs)
    hub = {k: from_pretrained_kwargs[k] for k in ("revision", "cache_dir", "token") if k in from_pretrained_kwargs}
    tensors = _checkpoint_tensors(name_or_path, **hub)
    if not tensors:
        return model
    num_layers = len(_language_model(model).layers)
    settings = getattr(model.config, "cue_recovery", None)
    _attach(model, settings["interval"] if settings else _interval_of(tensors, num_layers))
    language_model = _language_model(model)
    expected = {n for n, _ in language_model.named_parameters() if _NAMES.search(n)}
    if set(tensors) != expected:
        raise ValueError(
            f"The checkpoint's cue-recovery weights do not match the module: missing "
            f"{sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)}."
        )
    language_model.load_state_dict(tensors, strict=False)
    return model
