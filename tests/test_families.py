"""The family table: every tiny model finds its entry, and each entry's facts hold on the real model class."""

import pytest
import torch

from trl_vaopd.families import FAMILIES, family_of
from trl_vaopd.prefix_sharing import backbone_of
from trl_vaopd.tiny_models import TINY_FAMILIES, build_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_each_family_facts_hold_on_its_model(processors, family):
    model = build_model(family, processors[family])
    facts = family_of(model)
    assert facts is FAMILIES[family] and facts.model_type == model.config.model_type == family
    text_model = getattr(backbone_of(model), facts.text_model)
    if facts.cue_recovery:
        assert len(text_model.layers) == model.config.get_text_config().num_hidden_layers
        assert isinstance(text_model.norm, torch.nn.Module)
    visual = [getattr(model.config, key, None) for key in facts.visual_token_keys]
    assert any(i is not None for i in visual)
    # Multimodal RoPE families compute their prompts' positions with `get_rope_index`
    assert hasattr(backbone_of(model), "get_rope_index") == (facts.positions == "mrope")


def test_unknown_family_has_no_entry(processors):
    model = build_model("qwen3_vl", processors["qwen3_vl"])
    model.config.model_type = "not_a_family"
    assert family_of(model) is None
