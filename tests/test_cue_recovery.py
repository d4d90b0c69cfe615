"""ViCuR's cue-recovery module (docs/methods/vicur.md, "The cue-recovery module"): only the sink row changes, prefill
only, trainable (also next to LoRA), saved and loaded, used by `generate`, refused where the image tokens are unknown;
its size on Qwen3-VL-2B."""

from functools import partial

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
from trl_vaopd.families import text_model_of
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


def module_parameters(model) -> dict[str, torch.Tensor]:
    """The cue-recovery module's parameters, by the authors' names (`...sink_cross_attns.<layer>...`, `...sink_*_norm`)."""
    return {n: p for n, p in model.named_parameters() if ".sink_" in n}


def with_module(model, interval: int = 1, seed: int = 0):
    """The model with the module attached and its weights made non-zero (at attachment W_o is zero)."""
    add_cue_recovery(model, interval=interval)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


def layer_inputs(model, inputs) -> list[torch.Tensor]:
    """The hidden states entering each decoder layer and the final norm, as those modules see them (hooks registered
    after the module's run after it)."""
    language_model = text_model_of(model)
    seen = []

    def record(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    hooks = [
        m.register_forward_pre_hook(record, with_kwargs=True) for m in (*language_model.layers, language_model.norm)
    ]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return seen


def test_attention_block_matches_an_explicit_multihead_attention():
    block = CueRecoveryAttention(hidden_size=8, num_heads=2)
    torch.nn.init.normal_(block.o_proj.weight)
    query, visual = torch.randn(2, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = block(query, visual, mask)
    for b in range(2):
        q = block.q_proj(query[b]).view(2, 4)
        k, v = block.k_proj(visual[b, mask[b]]).view(-1, 2, 4), block.v_proj(visual[b, mask[b]]).view(-1, 2, 4)
        heads = [torch.softmax(k[:, h] @ q[h] / 4**0.5, dim=0) @ v[:, h] for h in range(2)]
        torch.testing.assert_close(out[b], block.o_proj(torch.cat(heads)))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_only_the_sink_row_changes_at_the_chosen_layers(processors, family):
    processor = processors[family]
    inputs = inputs_of(processor)
    plain = layer_inputs(build_model(family, processor, "student"), inputs)
    model = with_module(build_model(family, processor, "student"), interval=2)  # after layers 0, 2, ...
    with_cue = layer_inputs(model, inputs)
    assert torch.equal(with_cue[0], plain[0])
    sink = inputs["attention_mask"].long().argmax(dim=1)
    rows = torch.arange(len(sink))
    # What leaves layer 0 (layer 1's input): the sink rows moved, every other position is bit-identical
    changed = (with_cue[1] != plain[1]).any(dim=-1)
    assert changed[rows, sink].all()
    changed[rows, sink] = False
    assert not changed.any()
    num_layers = len(plain) - 1
    assert model.config.cue_recovery == {"interval": 2, "layers": list(range(0, num_layers, 2))}


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
        text_model_of(copied).sink_cross_attns["0"].o_proj.weight.zero_()
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
        p.requires_grad_(".sink_" in name)
    model(**inputs_of(processor)).logits.sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (".sink_" in name), name


def test_trainable_next_to_a_lora_adapter_and_saved_with_it(processors, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    processor = processors["qwen3_vl"]
    model = with_module(build_model("qwen3_vl", processor))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=cue_recovery_modules_to_save(model))
    peft_model = get_peft_model(model, config)
    assert has_cue_recovery(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(".sink_" in n for n in trainable)
    inputs = inputs_of(processor)
    peft_model(**inputs).logits.sum().backward()
    module_grads = [p.grad for n, p in peft_model.named_parameters() if ".sink_" in n and p.requires_grad]
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
    model.config.model_type = "outside_the_table"
    with pytest.raises(ValueError, match="got a 'outside_the_table' model"):
        add_cue_recovery(model)


def test_size_on_the_real_qwen3_vl_2b_config():
    """6 module layers of 4 d^2 and one shared norm pair (2 d) on Qwen3-VL-2B (d = 2048, 28 layers): 100.7M, 4.52%."""
    from transformers import Qwen3VLForConditionalGeneration

    from trl_vaopd.model_shapes import REAL_SHAPES, qwen3_vl_config
    from trl_vaopd.tiny_models import build_tokenizer

    # The published Qwen/Qwen3-VL-2B-Instruct shape (no download), built on the meta device
    config = qwen3_vl_config(REAL_SHAPES["student"], build_tokenizer())
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    add_cue_recovery(model, interval=5)
    language_model = backbone_of(model).language_model
    assert list(language_model.sink_cross_attns) == ["0", "5", "10", "15", "20", "25"]
    assert model.config.cue_recovery["layers"] == [0, 5, 10, 15, 20, 25]
    added = sum(p.numel() for p in module_parameters(model).values())
    assert added == 6 * 4 * 2048**2 + 2 * 2048 == 100_667_392  # one norm pair shared by the six layers
    assert round(100 * added / (total + added), 2) == 4.52  # of the student with its module


# ----------------------------------------------------------------------------------------------------------------
# The authors' function (`StudentQwen3VLTextModel` of tiankanghui/ViCuR), recomputed independently of the package:
# explicit attention, per-row gathering, Qwen3-VL's RMSNorm, and the authors' order inside the decoder loop
# (layer, then DeepStack's features, then the sink update), run on a model without the package's hooks.


def official_weights(model) -> dict[str, torch.Tensor]:
    """The module's weights by the authors' names under the language model (`sink_cross_attns.0.q_proj.weight`)."""
    return {n.split("language_model.", 1)[1]: p.detach().clone() for n, p in module_parameters(model).items()}


def qwen_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def official_sink_update(hidden, sink, visual, weights, layer, num_heads, eps):
    """`hidden` with each row's sink replaced by `sink + W_o CrossAttention(...)`, rows without visual tokens kept."""
    out = hidden.clone()
    width = hidden.size(-1)
    head_dim = width // num_heads
    w = {name: weights[f"sink_cross_attns.{layer}.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for b in range(hidden.size(0)):
        visual_rows = visual[b].nonzero().flatten()
        if visual_rows.numel() == 0:
            continue
        h_sink = hidden[b, sink[b]]
        q = (qwen_rms_norm(h_sink, weights["sink_q_norm.weight"], eps) @ w["q_proj"].T).view(num_heads, head_dim)
        kv = qwen_rms_norm(hidden[b, visual_rows], weights["sink_kv_norm.weight"], eps)
        k = (kv @ w["k_proj"].T).view(-1, num_heads, head_dim)
        v = (kv @ w["v_proj"].T).view(-1, num_heads, head_dim)
        scores = torch.einsum("hd,nhd->hn", q, k) * head_dim**-0.5
        attended = torch.einsum("hn,nhd->hd", torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        out[b, sink[b]] = h_sink + attended.reshape(width) @ w["o_proj"].T
    return out


def official_logits(plain_model, inputs, weights, interval, sink_token_id, deepstack_first=True):
    """Logits of `plain_model` with the authors' sink updates after every `interval`-th layer, inserted by hooks.

    The hook on layer i's output sees the states before DeepStack adds its features (transformers adds them after
    the layer returns); the authors update the sink after they are added, so the update reads `h + deepstack[i]` at
    the visual positions. The sink itself is not a visual position, so DeepStack's later add leaves it alone.
    `deepstack_first=False` is the other order, as a control.
    """
    language_model = backbone_of(plain_model).language_model
    text = plain_model.config.get_text_config()
    mask = inputs["attention_mask"].bool()
    hits = (inputs["input_ids"] == sink_token_id) & mask
    sink = torch.where(hits.any(dim=1), hits.long().argmax(dim=1), (~mask).sum(dim=1))  # the authors' rule
    seen = {}

    def capture(module, args, kwargs):
        seen.update(visual=kwargs["visual_pos_masks"], deepstack=kwargs.get("deepstack_visual_embeds") or [])

    def after_layer(index, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        read = hidden.clone()
        if deepstack_first and index < len(seen["deepstack"]):
            read[seen["visual"]] += seen["deepstack"][index]
        updated = official_sink_update(
            read, sink, seen["visual"], weights, index, text.num_attention_heads, text.rms_norm_eps
        )
        # Only the sink rows come from the update; everything else stays as the layer left it
        hidden = hidden.clone()
        rows = torch.arange(len(sink))
        hidden[rows, sink] = updated[rows, sink]
        return hidden

    hooks = [language_model.register_forward_pre_hook(capture, with_kwargs=True)]
    hooks += [
        language_model.layers[i].register_forward_hook(partial(after_layer, i))
        for i in range(0, len(language_model.layers), interval)
    ]
    with torch.no_grad():
        logits = plain_model(**inputs).logits
    for hook in hooks:
        hook.remove()
    return logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("interval", [1, 2])
def test_the_module_computes_the_authors_function_with_deepstack(processors, interval):
    """Qwen3-VL as transformers builds it (DeepStack adds vision features after decoder layer 0 of the tiny model):
    the package's student equals the authors' forward to 1e-5, and the other order (the sink read before DeepStack's
    features) is measurably different, so the comparison can fail."""
    processor = processors["qwen3_vl"]
    inputs = inputs_of(processor)
    model = with_module(build_model("qwen3_vl", processor, "student"), interval=interval).eval()
    plain = build_model("qwen3_vl", processor, "student").eval()
    assert len(model.config.vision_config.deepstack_visual_indexes) > 0
    sink_id = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (inputs["input_ids"] == sink_id).any()
    with torch.no_grad():
        ours = model(**inputs).logits
    official = official_logits(plain, inputs, official_weights(model), interval, sink_id)
    assert relative_error(ours, official) < 1e-5
    other_order = official_logits(plain, inputs, official_weights(model), interval, sink_id, deepstack_first=False)
    assert relative_error(other_order, official) > 1e-2


@pytest.mark.parametrize("cache_keyword", ["cache", "past_key_values"])
def test_a_continuation_of_a_cache_runs_no_module_however_the_cache_is_passed(processors, cache_keyword):
    """A cached continuation whose new tokens hold the image: its sink is in the cache, so nothing changes (the module
    would otherwise update the continuation's first token)."""
    processor = processors["qwen3_vl"]
    one = inputs_of(processor, n=1)
    ids, mask, types = one["input_ids"], one["attention_mask"], one["mm_token_type_ids"]
    split = int((ids[0] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).nonzero()[0]) - 1

    def continuation(model) -> torch.Tensor:
        backbone = backbone_of(model)
        with torch.no_grad():
            prefix = backbone(
                input_ids=ids[:, :split],
                attention_mask=mask[:, :split],
                mm_token_type_ids=types[:, :split],
                use_cache=True,
            )
            positions, _ = backbone.get_rope_index(
                ids, mm_token_type_ids=types, image_grid_thw=one["image_grid_thw"], attention_mask=mask
            )
            cache = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
            return backbone(
                input_ids=ids[:, split:],
                attention_mask=mask,
                mm_token_type_ids=types,
                position_ids=positions[:, :, split:],
                pixel_values=one["pixel_values"],
                image_grid_thw=one["image_grid_thw"],
                use_cache=True,
                **{cache_keyword: cache},
            ).last_hidden_state

    with_cue = continuation(with_module(build_model("qwen3_vl", processor, "student"), interval=1))
    assert torch.equal(with_cue, continuation(build_model("qwen3_vl", processor, "student")))


def test_a_checkpoint_in_the_authors_format_loads_and_generates(processors, tmp_path):
    """The authors' names and shapes (one shared norm pair, `sink_cross_attns.<layer>`, interval 5, no record in the
    config) written into a plain checkpoint: the loader finds the module, and the student computes their function."""
    from safetensors.torch import load_file, save_file

    processor = processors["qwen3_vl"]
    plain = build_model("qwen3_vl", processor, "student").eval()
    plain.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    text = plain.config.get_text_config()
    d, generator = text.hidden_size, torch.Generator().manual_seed(3)
    official = {"sink_q_norm.weight": 1 + 0.1 * torch.randn(d, generator=generator)}
    official["sink_kv_norm.weight"] = 1 + 0.1 * torch.randn(d, generator=generator)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # every 5th layer: only layer 0 of the tiny model
        official[f"sink_cross_attns.0.{name}.weight"] = 0.3 * torch.randn(d, d, generator=generator)
    state = load_file(tmp_path / "model.safetensors")
    state.update({f"model.language_model.{name}": value for name, value in official.items()})
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = load_with_cue_recovery(tmp_path).eval()
    assert has_cue_recovery(loaded) and loaded.config.cue_recovery == {"interval": 2, "layers": [0]}
    inputs = inputs_of(processor)
    sink_id = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        ours = loaded(**inputs).logits
    assert relative_error(ours, official_logits(plain, inputs, official, 5, sink_id)) < 1e-5
    sequences, _ = generated_logits(loaded, inputs, steps=3)
    assert sequences.size(1) == inputs["input_ids"].size(1) + 3


def test_a_saved_student_carries_the_authors_names(processors, tmp_path):
    from safetensors import safe_open

    processor = processors["qwen3_vl"]
    with_module(build_model("qwen3_vl", processor, "student"), interval=1).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        names = {k for k in f.keys() if ".sink_" in k}
    layers = [0, 1]
    expected = {
        f"model.language_model.sink_cross_attns.{i}.{m}.weight"
        for i in layers
        for m in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert names == expected | {"model.language_model.sink_q_norm.weight", "model.language_model.sink_kv_norm.weight"}
