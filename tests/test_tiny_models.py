"""Tests for `trl_vaopd.tiny_models`: tiny offline VLMs built with the real transformers classes.

Everything is built locally (no Hub access), so the whole file runs in well under a minute on 2 CPU cores.
"""

import math
import os


# The builders never touch the Hub; make any accidental download fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from trl_vaopd.tiny_models import (
    GEMMA3_CHAT_TEMPLATE,
    GEMMA4_CHAT_TEMPLATE,
    INTERNVL_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    LLAVA_ONEVISION_CHAT_TEMPLATE,
    QWEN_CHAT_TEMPLATE,
    TINY_FAMILIES,
    build_model,
    build_processor,
    build_tiny_vlm,
    build_tokenizer,
    save_tiny_vlm,
)


QWEN_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Keys the processor must return besides input_ids / attention_mask / pixel_values.
GRID_KEYS = {
    "qwen3_vl": {"image_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"image_grid_thw", "mm_token_type_ids"},
    "qwen2_vl": {"image_grid_thw", "mm_token_type_ids"},
    "qwen3_vl_moe": {"image_grid_thw", "mm_token_type_ids"},
    "qwen3_5": {"image_grid_thw", "mm_token_type_ids"},
    "llava": set(),
    "llava_next": {"image_sizes"},
    "llava_onevision": {"image_sizes"},
    "gemma3": {"token_type_ids"},
    "idefics3": {"pixel_attention_mask"},
    "internvl": set(),
    "glm4v": {"image_grid_thw", "mm_token_type_ids"},
    "smolvlm": {"pixel_attention_mask"},
    "gemma4": {"image_position_ids", "mm_token_type_ids"},
}
QWEN_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl", "qwen3_vl_moe", "qwen3_5")
IMAGE_TOKEN = {
    **dict.fromkeys(QWEN_FAMILIES, "<|image_pad|>"),
    "llava": "<image>",
    "llava_next": "<image>",
    "llava_onevision": "<image>",
    "gemma3": "<|image_pad|>",
    "idefics3": "<image>",
    "internvl": "<|image_pad|>",
    "glm4v": "<|image_pad|>",
    "smolvlm": "<image>",
    "gemma4": "<|image_pad|>",
}
VISION_PREFIX = {
    **dict.fromkeys(QWEN_FAMILIES, "model.visual."),
    "llava": "model.vision_tower.",
    "llava_next": "model.vision_tower.",
    "llava_onevision": "model.vision_tower.",
    "gemma3": "model.vision_tower.",
    "idefics3": "model.vision_model.",
    "internvl": "model.vision_tower.",
    "glm4v": "model.visual.",
    "smolvlm": "model.vision_model.",
    "gemma4": "model.vision_tower.",
}
CHAT_TEMPLATE = {
    **dict.fromkeys(QWEN_FAMILIES, QWEN_CHAT_TEMPLATE),
    "llava": LLAVA_CHAT_TEMPLATE,
    "llava_next": LLAVA_CHAT_TEMPLATE,
    "llava_onevision": LLAVA_ONEVISION_CHAT_TEMPLATE,
    "gemma3": GEMMA3_CHAT_TEMPLATE,
    "idefics3": LLAVA_CHAT_TEMPLATE,
    "internvl": INTERNVL_CHAT_TEMPLATE,
    "glm4v": QWEN_CHAT_TEMPLATE,
    "smolvlm": LLAVA_CHAT_TEMPLATE,
    "gemma4": GEMMA4_CHAT_TEMPLATE,
}
# Idefics3's processor adds its image markers to (its copy of) the tokenizer, after the shared ids; SmolVLM's builder
# adds them to its processor's copy
ADDED_TOKENS = {
    "idefics3": ["<fake_token_around_image>", "<end_of_utterance>"],
    "smolvlm": ["<fake_token_around_image>", "<global-img>"],
    # Gemma 4's audio markers (named on a copy), then the video token its processor adds
    "gemma4": ["<|audio_start|>", "<|audio_end|>", "<|audio_pad|>", "<|video|>"],
}


def _image(seed: int = 0) -> Image.Image:
    """A deterministic 32x32 RGB image with some structure (not a flat colour)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _conversation(image: Image.Image) -> list:
    return [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is the length?"}],
            }
        ]
    ]


def _inputs(processor, image=None):
    return processor.apply_chat_template(
        _conversation(image if image is not None else _image()),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processors(tokenizer):
    return {family: build_processor(family, tokenizer) for family in TINY_FAMILIES}


@pytest.fixture(scope="module")
def pairs(processors):
    """(student, teacher) per family, shared read-only by the tests that don't train."""
    return {
        family: (build_model(family, proc, "student", seed=0), build_model(family, proc, "teacher", seed=0))
        for family, proc in processors.items()
    }


# --------------------------------------------------------------------------------------------------------- tokenizer


def test_families():
    assert TINY_FAMILIES == (
        "qwen3_vl",
        "qwen2_5_vl",
        "qwen2_vl",
        "qwen3_vl_moe",
        "llava",
        "llava_next",
        "llava_onevision",
        "gemma3",
        "idefics3",
        "internvl",
        "glm4v",
        "smolvlm",
        "qwen3_5",
        "gemma4",
    )


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 512
    vocab = tokenizer.get_vocab()
    for token in [*QWEN_SPECIALS, "<image>"]:
        assert token in vocab, token
        # Special tokens must stay single tokens when they appear in text.
        assert tokenizer.encode(token, add_special_tokens=False) == [vocab[token]]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    text = "What is 12 + 7? The length is 19 cm."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_chat_template(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How long?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How long?<|im_end|>\n"
        "<|im_start|>assistant\n7<|im_end|>\n"
    )
    # The assistant turn ends with the eos token.
    assert rendered.rstrip("\n").endswith(tokenizer.eos_token)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # Plain-string content (TRL's text-only conversational format) renders too.
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nHi<|im_end|>\n"


def test_tokenizer_deterministic_and_custom_corpus():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    small = build_tokenizer(corpus=["one two three four five six seven"] * 10, vocab_size=300)
    assert len(small) <= 300
    assert "<|image_pad|>" in small.get_vocab() and small.eos_token == "<|im_end|>"


# ----------------------------------------------------------------------------------------------- per-family builds


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_processor(family, processors, tokenizer):
    processor = processors[family]
    expected = {
        "qwen3_vl": "Qwen3VLProcessor",
        "qwen2_5_vl": "Qwen2_5_VLProcessor",
        "qwen2_vl": "Qwen2VLProcessor",
        "qwen3_vl_moe": "Qwen3VLProcessor",
        "qwen3_5": "Qwen3VLProcessor",
        "llava": "LlavaProcessor",
        "llava_next": "LlavaNextProcessor",
        "llava_onevision": "LlavaOnevisionProcessor",
        "gemma3": "Gemma3Processor",
        "idefics3": "Idefics3Processor",
        "internvl": "InternVLProcessor",
        "glm4v": "Glm4vProcessor",
        "smolvlm": "SmolVLMProcessor",
        "gemma4": "Gemma4Processor",
    }
    assert type(processor).__name__ == expected[family]
    assert processor.chat_template == CHAT_TEMPLATE[family]
    added = {token: len(tokenizer) + i for i, token in enumerate(ADDED_TOKENS.get(family, []))}
    assert processor.tokenizer.get_vocab() == {**tokenizer.get_vocab(), **added}
    assert processor.tokenizer.padding_side == "left"
    # The shared tokenizer keeps its Qwen template even after building the Llava processor.
    assert tokenizer.chat_template == QWEN_CHAT_TEMPLATE

    inputs = _inputs(processor)
    assert {"input_ids", "attention_mask", "pixel_values"} | GRID_KEYS[family] <= set(inputs)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    n_image_tokens = int((inputs["input_ids"] == image_token_id).sum())
    assert 1 <= n_image_tokens <= 16, n_image_tokens  # only a handful of visual tokens for a 32x32 image
    if "image_grid_thw" in GRID_KEYS[family]:
        grid = inputs["image_grid_thw"]
        assert grid.shape == (1, 3)
        assert int(grid.prod()) // 4 == n_image_tokens  # 2x2 merge
        assert inputs["pixel_values"].shape[0] == int(grid.prod())
    else:
        # Idefics3 pads its images to one row per prompt: (prompts, images, 3, height, width)
        # LLaVA-NeXT: (images, base view + tiles of the chosen pinpoint, 3, height, width)
        shape = {
            "idefics3": (1, 1, 3, 32, 32),
            "smolvlm": (1, 1, 3, 32, 32),
            # Gemma 4: (images, patches padded to 70 soft tokens of 2x2 patches, 8 x 8 x 3 pixels)
            "gemma4": (1, 280, 192),
            "llava_next": (1, 2, 3, 32, 32),
            "llava_onevision": (1, 2, 3, 32, 32),
        }.get(family, (1, 3, 32, 32))
        assert inputs["pixel_values"].shape == shape
    # Batched + padded prompts of different lengths work too (TRL batches prompts).
    batch = processor.apply_chat_template(
        [
            _conversation(_image(1))[0],
            [{"role": "user", "content": [{"type": "image", "image": _image(2)}, {"type": "text", "text": "Hi"}]}],
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,
    )
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][1, 0] == 0  # left padding


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_model_config(family, pairs, tokenizer):
    student, teacher = pairs[family]
    expected = {
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
        "qwen3_5": "Qwen3_5ForConditionalGeneration",
        "llava": "LlavaForConditionalGeneration",
        "llava_next": "LlavaNextForConditionalGeneration",
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
        "gemma3": "Gemma3ForConditionalGeneration",
        "idefics3": "Idefics3ForConditionalGeneration",
        "internvl": "InternVLForConditionalGeneration",
        "glm4v": "Glm4vForConditionalGeneration",
        "smolvlm": "SmolVLMForConditionalGeneration",
        "gemma4": "Gemma4ForConditionalGeneration",
    }
    vocab = tokenizer.get_vocab()
    for model in (student, teacher):
        assert type(model).__name__ == expected[family]
        text = model.config.get_text_config()
        vocab_size = len(tokenizer) + len(ADDED_TOKENS.get(family, []))
        assert text.vocab_size == vocab_size
        assert model.get_output_embeddings().weight.shape[0] == vocab_size
        assert text.num_hidden_layers == 2
        assert model.config.image_token_id == vocab[IMAGE_TOKEN[family]]
        if family == "glm4v":
            assert model.config.video_token_id == vocab["<|video_pad|>"]
            assert model.config.image_start_token_id == vocab["<|vision_start|>"]
            assert model.config.image_end_token_id == vocab["<|vision_end|>"]
        if family in QWEN_FAMILIES:
            assert model.config.video_token_id == vocab["<|video_pad|>"]
            assert model.config.vision_start_token_id == vocab["<|vision_start|>"]
            assert model.config.vision_end_token_id == vocab["<|vision_end|>"]
        assert text.eos_token_id == tokenizer.eos_token_id
        assert text.pad_token_id == tokenizer.pad_token_id
        assert text.bos_token_id is not None
        eos = model.generation_config.eos_token_id
        assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id
        assert sum(p.numel() for p in model.parameters()) < 500_000  # tiny
    assert student.config.get_text_config().hidden_size < teacher.config.get_text_config().hidden_size
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        vision = student.config.vision_config
        assert vision.patch_size == 16 and vision.spatial_merge_size == 2
        assert all(0 <= i < vision.depth for i in vision.deepstack_visual_indexes)
    if family == "qwen2_5_vl":
        vision = student.config.vision_config
        assert vision.patch_size == 14 and vision.spatial_merge_size == 2
        assert all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)
    if family == "qwen2_vl":
        vision = student.config.vision_config
        assert vision.patch_size == 14 and vision.spatial_merge_size == 2
    if family == "qwen3_5":
        text = student.config.get_text_config()
        assert text.layer_types == ["linear_attention", "full_attention"]
        assert sum(".linear_attn." in n for n, _ in student.named_parameters()) > 0
    if family == "qwen3_vl_moe":
        text = student.config.get_text_config()
        assert text.num_experts == 4 and text.num_experts_per_tok == 2
        assert sum("mlp.experts" in n for n, _ in student.named_parameters()) > 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generate_and_backbone(family, processors, pairs):
    processor = processors[family]
    inputs = _inputs(processor)
    for model in pairs[family]:
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=5, do_sample=True)
        assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5
        with torch.no_grad():
            hidden = model.base_model(**inputs).last_hidden_state
        assert hidden.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().hidden_size)
        assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_image_changes_output(family, processors, pairs):
    # The image really reaches the language model: a different image changes the last hidden state.
    student, _ = pairs[family]
    with torch.no_grad():
        a = student(**_inputs(processors[family], _image(1))).logits
        b = student(**_inputs(processors[family], _image(2))).logits
    assert a.shape == b.shape
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_determinism(family, processors):
    processor = processors[family]
    state_a = build_model(family, processor, "student", seed=0).state_dict()
    state_b = build_model(family, processor, "student", seed=0).state_dict()
    state_c = build_model(family, processor, "student", seed=1).state_dict()
    assert state_a.keys() == state_b.keys() == state_c.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert any(not torch.equal(state_a[k], state_c[k]) for k in state_a)
    # Building doesn't consume or reset the caller's RNG stream.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(family, processor, "teacher", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_build_tiny_vlm_and_dtype(tokenizer):
    model, processor = build_tiny_vlm("qwen3_vl", size="teacher", seed=3, tokenizer=tokenizer)
    assert model.config.get_text_config().hidden_size == 64
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    half = build_model("qwen2_5_vl", processor, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        build_processor("not_a_family", tokenizer)
    with pytest.raises(ValueError):
        build_model("qwen3_vl", processor, size="huge")


# ------------------------------------------------------------------------------------------------- save / reload


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_reload_roundtrip(family, tokenizer, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl.trainer.utils import create_model_from_path

    path = save_tiny_vlm(tmp_path / family, family=family, size="student", seed=7, tokenizer=tokenizer)
    assert path == str(tmp_path / family)
    model, processor = build_tiny_vlm(family, size="student", seed=7, tokenizer=tokenizer)

    reloaded = AutoModelForImageTextToText.from_pretrained(path)
    # How TRL loads a model given as a string (and the processor, when none is passed).
    trl_loaded = create_model_from_path(path)
    reloaded_processor = AutoProcessor.from_pretrained(path)
    assert type(reloaded) is type(model) is type(trl_loaded)
    assert type(reloaded_processor) is type(processor)
    assert reloaded_processor.chat_template == processor.chat_template
    assert reloaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor.tokenizer.get_vocab().items() >= tokenizer.get_vocab().items()
    assert reloaded_processor.tokenizer.padding_side == "left"
    assert reloaded_processor.tokenizer.eos_token == "<|im_end|>"
    assert reloaded.generation_config.pad_token_id == tokenizer.pad_token_id

    inputs = _inputs(processor)
    reloaded_inputs = _inputs(reloaded_processor)
    assert inputs.keys() == reloaded_inputs.keys()
    assert all(torch.equal(inputs[k], reloaded_inputs[k]) for k in inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.equal(reloaded(**reloaded_inputs).logits, logits)
        assert torch.equal(trl_loaded(**reloaded_inputs).logits, logits)


# ---------------------------------------------------------------------------------------- TRL DistillationTrainer


def _distillation_dataset():
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "What number is shown?"}] for _ in range(4)],
            "images": [[_image(i)] for i in range(4)],
        }
    )


def _distillation_args(output_dir):
    from trl import DistillationConfig

    return DistillationConfig(
        output_dir=str(output_dir),
        max_steps=1,
        per_device_train_batch_size=2,
        max_completion_length=8,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
    )


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_trl_distillation_trainer_one_step(family, tokenizer, tmp_path):
    from trl import DistillationTrainer

    processor = build_processor(family, tokenizer)
    student = build_model(family, processor, "student", seed=0)
    teacher = build_model(family, processor, "teacher", seed=1)
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_distillation_args(tmp_path),
        train_dataset=_distillation_dataset(),
        processing_class=processor,
    )
    result = trainer.train()

    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and logged["completions/mean_length"] > 0
    changed = {n for n, p in student.named_parameters() if not torch.equal(student_before[n], p)}
    assert any(n.startswith("lm_head") for n in changed)
    # The vision tower got gradients: the images went through TRL's forward pass, not just the text.
    assert any(n.startswith(VISION_PREFIX[family]) for n in changed), sorted(changed)[:5]
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_trl_distillation_trainer_from_paths(family, tokenizer, tmp_path):
    # Models given as paths: TRL loads them with `create_model_from_path` and the processor with `AutoProcessor`.
    from trl import DistillationTrainer

    student_path = save_tiny_vlm(tmp_path / "student", family=family, size="student", seed=0, tokenizer=tokenizer)
    teacher_path = save_tiny_vlm(tmp_path / "teacher", family=family, size="teacher", seed=1, tokenizer=tokenizer)
    trainer = DistillationTrainer(
        model=student_path,
        teacher_model=teacher_path,
        args=_distillation_args(tmp_path / "out"),
        train_dataset=_distillation_dataset(),
    )
    result = trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
