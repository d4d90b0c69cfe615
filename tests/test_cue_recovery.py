"""ViCuR's cue-recovery module (docs/methods/vicur.md, "The cue-recovery module"): only the sink row changes, prefill
only, trainable (also next to LoRA), saved and loaded, used by `generate`, refused where the image tokens are unknown;
its size on Qwen3-VL-2B."""

import pytest
import torch
from conftest import noise_image
from trl.data_utils import prepare_multimodal_messages

from trl_vaopd.cue_recovery import (
    CueRecoveryAttention,
    add_cue_recovery,
    cue_recovery_modules_to_save,
    has_cue_recovery,
    load_with_cue_recovery,
)
from trl_vaopd.evaluation import tokenize_conversations
from trl_vaopd.prefix_sharing import backbone_of
from trl_vaopd.tiny_models import TINY_FAMILIES, build_model


def inputs_of(processor, n: int = 3) -> dict:
    """A left-padded batch of image questions of different lengths."""
    conversations = [
        prepare_multimodal_messages(
            [{"role": "user", "content": "What is it?" + " Look." * i}], images=[noise_image(i)]
        )
        for i in range(n)
    ]
    return tokenize_conversations(processor, conversations)


def with_module(model, interval: int = 1, seed: int = 0):
    """The model with the module attached and its weights made non-zero (at attachment W_o is zero)."""
    add_cue_recovery(model, interval=interval)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone_of(model).language_model.cue_recovery.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def layer_outputs(model, inputs) -> list[torch.Tensor]:
    outputs = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
        for layer in backbone_of(model).language_model.layers
    ]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return outputs


def test_attention_block_matches_an_explicit_multihead_attention():
    block = CueRecoveryAttention(hidden_size=8, num_heads=2)
    torch.nn.init.normal_(block.o_proj.weight)
    sink, visual = torch.randn(2, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = block(sink, visual, mask)
    for b in range(2):
        q = block.q_proj(block.norm_q(sink[b])).view(2, 4)
        kv = block.norm_kv(visual[b, mask[b]])
        k, v = block.k_proj(kv).view(-1, 2, 4), block.v_proj(kv).view(-1, 2, 4)
        heads = [torch.softmax(k[:, h] @ q[h] / 4**0.5, dim=0) @ v[:, h] for h in range(2)]
        torch.testing.assert_close(out[b], sink[b] + block.o_proj(torch.cat(heads)))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_only_the_sink_row_changes_at_the_chosen_layers(processors, family):
    processor = processors[family]
    inputs = inputs_of(processor)
    plain = layer_outputs(build_model(family, processor, "student"), inputs)
    model = with_module(build_model(family, processor, "student"), interval=2)  # layers 0, 2, ...
    with_cue = layer_outputs(model, inputs)
    sink = inputs["attention_mask"].long().argmax(dim=1)
    rows = torch.arange(len(sink))
    # Layer 0's output: the sink rows moved, every other position is bit-identical
    changed = (with_cue[0] != plain[0]).any(dim=-1)
    assert changed[rows, sink].all()
    changed[rows, sink] = False
    assert not changed.any()
    # Layer 1 runs no module: its non-sink rows differ only through attention to the updated sinks
    assert model.config.cue_recovery == {"interval": 2, "layers": list(range(0, len(plain), 2))}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_deep_copy_runs_its_own_module(processors, family):
    import copy

    processor = processors[family]
    model = with_module(build_model(family, processor, "student"))
    inputs = inputs_of(processor)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        plain = build_model(family, processor, "student")(**inputs).logits
        assert torch.equal(copied(**inputs).logits, model(**inputs).logits)
        assert not torch.equal(copied(**inputs).logits, plain)
        # The copy's module is its own: changing it changes the copy only
        backbone_of(copied).language_model.cue_recovery[0].o_proj.weight.zero_()
        assert not torch.equal(copied(**inputs).logits, model(**inputs).logits)


def test_an_attention_mask_passed_positionally_finds_the_same_sink(processors):
    processor = processors["qwen3_vl"]
    model = with_module(build_model("qwen3_vl", processor))
    inputs = inputs_of(processor)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    with torch.no_grad():
        by_keyword = backbone_of(model)(input_ids=ids, attention_mask=mask, **inputs).last_hidden_state
        positional = backbone_of(model)(ids, mask, **inputs).last_hidden_state
    assert torch.equal(positional, by_keyword)


def test_the_module_is_the_identity_when_attached(processors):
    processor = processors["qwen3_vl"]
    inputs = inputs_of(processor)
    plain, attached = build_model("qwen3_vl", processor), add_cue_recovery(build_model("qwen3_vl", processor))
    with torch.no_grad():
        assert torch.equal(plain(**inputs).logits, attached(**inputs).logits)


def generated_logits(model, inputs, steps: int = 4):
    """Greedy decoding with a KV cache (prefill, then one token per step): the sequences and each step's logits."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prefill_with_a_cache_then_decoding_equals_full_forwards(processors, family):
    processor = processors[family]
    model = with_module(build_model(family, processor, "student"))
    inputs = inputs_of(processor)
    sequences, step_logits = generated_logits(model, inputs)
    prompt_len, steps = inputs["input_ids"].size(1), step_logits.size(1)
    full = dict(inputs, input_ids=sequences)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, prompt_len:])], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            full[key] = torch.cat([inputs[key], torch.zeros_like(sequences[:, prompt_len:])], dim=1)
    with torch.no_grad():
        logits = model(**full).logits[:, prompt_len - 1 : prompt_len - 1 + steps]
    torch.testing.assert_close(step_logits, logits, atol=1e-5, rtol=1e-4)


def test_generate_uses_the_module(processors):
    processor = processors["qwen3_vl"]
    inputs = inputs_of(processor)
    _, plain = generated_logits(build_model("qwen3_vl", processor), inputs, steps=1)
    _, with_cue = generated_logits(with_module(build_model("qwen3_vl", processor)), inputs, steps=1)
    assert (plain - with_cue).abs().max() > 1e-3  # the prefill ran it


def test_gradients_reach_the_module_and_nothing_frozen(processors):
    processor = processors["qwen3_vl"]
    model = with_module(build_model("qwen3_vl", processor))
    for name, p in model.named_parameters():
        p.requires_grad_(".cue_recovery." in name)
    model(**inputs_of(processor)).logits.sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (".cue_recovery." in name), name


def test_trainable_next_to_a_lora_adapter_and_saved_with_it(processors, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    processor = processors["qwen3_vl"]
    model = with_module(build_model("qwen3_vl", processor))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=cue_recovery_modules_to_save(model))
    peft_model = get_peft_model(model, config)
    assert has_cue_recovery(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(".cue_recovery." in n for n in trainable)
    inputs = inputs_of(processor)
    peft_model(**inputs).logits.sum().backward()
    module_grads = [p.grad for n, p in peft_model.named_parameters() if ".cue_recovery." in n and p.requires_grad]
    assert module_grads and all(g is not None and g.abs().sum() > 0 for g in module_grads)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(add_cue_recovery(build_model("qwen3_vl", processor), 1), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, peft_model(**inputs).logits)


def test_save_and_load_round_trip(processors, tmp_path):
    processor = processors["qwen3_vl"]
    model = with_module(build_model("qwen3_vl", processor), interval=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_with_cue_recovery(tmp_path)
    assert has_cue_recovery(loaded)
    inputs = inputs_of(processor)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    # Without the module the checkpoint is another model: the plain loader drops the module's weights
    from transformers import AutoModelForImageTextToText

    with torch.no_grad():
        assert not torch.equal(
            AutoModelForImageTextToText.from_pretrained(tmp_path)(**inputs).logits, model(**inputs).logits
        )


def test_other_families_are_refused_by_name(processors):
    model = build_model("qwen3_vl", processors["qwen3_vl"])
    model.config.model_type = "idefics3"
    with pytest.raises(ValueError, match="got a 'idefics3' model"):
        add_cue_recovery(model)


def test_size_on_the_real_qwen3_vl_2b_config():
    """6 modules of 4 d^2 (+ 2 d of norms) on Qwen3-VL-2B (d = 2048, 28 layers): 100.7M parameters, 4.52%."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    # The published Qwen/Qwen3-VL-2B-Instruct config.json values that set the parameter count (no download)
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [5, 11, 17],
        },
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    add_cue_recovery(model, interval=5)
    modules = backbone_of(model).language_model.cue_recovery
    assert len(modules) == 6 and model.config.cue_recovery["layers"] == [0, 5, 10, 15, 20, 25]
    added = sum(p.numel() for p in modules.parameters())
    assert added == 6 * (4 * 2048**2 + 2 * 2048) == 100_687_872  # 100,663,296 in the four maps, 24,576 in the norms
    assert round(100 * added / (total + added), 2) == 4.52  # of the student with its module
