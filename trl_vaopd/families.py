"""What this package knows about each vision-language model family, one entry per family.

Prefix sharing (`trl_vaopd.prefix_sharing`), the cue-recovery module (`trl_vaopd.cue_recovery`) and the tiny models
(`trl_vaopd.tiny_models`) read a family's facts here instead of checking `model_type` themselves, so that supporting a
family is one entry in `FAMILIES` (and its tests).
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftModel
from torch import nn


__all__ = ["FAMILIES", "Family", "family_of", "text_model_of"]


@dataclass(frozen=True)
class Family:
    """One model family's facts.

    Args:
        model_type: the `model_type` of the family's composite config.
        positions: how token positions continue after a cached prompt: `"mrope"` (multimodal RoPE: the completion's
            text positions continue from the prompt's largest position, on every axis, from `get_rope_index`) or
            `"1d"` (plain positions continue from the cache length).
        prefix_sharing: whether the prefix-shared passes are tested to equal full passes on this family.
        cue_recovery: whether the cue-recovery module is tested on this family: its text model has `layers` and
            `norm`, and its visual placeholder tokens are known from `visual_token_keys`.
        text_model: attribute of the multimodal backbone holding the decoder stack.
        visual_token_keys: config attributes holding the ids of the image (and video) placeholder tokens.
    """

    model_type: str
    positions: str
    prefix_sharing: bool
    cue_recovery: bool
    text_model: str = "language_model"
    visual_token_keys: tuple[str, ...] = ("image_token_id", "video_token_id")


# The Qwen-VL families and GLM-4V: multimodal RoPE from `get_rope_index`
_QWEN = {"positions": "mrope", "prefix_sharing": True, "cue_recovery": True}

#: Every family this package knows, by `model_type`, in the order the tiny models list them
FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("qwen3_vl", **_QWEN),
        Family("qwen2_5_vl", **_QWEN),
        Family("qwen2_vl", **_QWEN),
        Family("qwen3_vl_moe", **_QWEN),
        Family("llava", positions="1d", prefix_sharing=True, cue_recovery=True),
        Family("llava_next", positions="1d", prefix_sharing=True, cue_recovery=True),
        Family("llava_onevision", positions="1d", prefix_sharing=True, cue_recovery=True),
        Family("gemma3", positions="1d", prefix_sharing=True, cue_recovery=True),
        Family("idefics3", positions="1d", prefix_sharing=True, cue_recovery=True, text_model="text_model"),
        Family("internvl", positions="1d", prefix_sharing=True, cue_recovery=True),
        Family("glm4v", **_QWEN),
        Family("smolvlm", positions="1d", prefix_sharing=True, cue_recovery=True, text_model="text_model"),
        Family("qwen3_5", **_QWEN),
        Family("gemma4", positions="1d", prefix_sharing=True, cue_recovery=True),
    )
}


def family_of(model: nn.Module) -> Family | None:
    """The facts of the model's family (from its config's `model_type`), `None` for a family not in `FAMILIES`."""
    return FAMILIES.get(model.config.model_type)


def text_model_of(model: nn.Module) -> nn.Module | None:
    """The decoder stack of a model (or of the model under a PEFT adapter), `None` for a family not in `FAMILIES`."""
    if isinstance(model, PeftModel):
        model = model.base_model.model
    family = family_of(model)
    return None if family is None else getattr(model.base_model, family.text_model)
