"""A trained student's checkpoint loads and samples the way the evaluation frameworks load it (docs/evaluation.md).

lmms-eval's `qwen3_vl` model (0.7.3) loads `Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=bfloat16)`,
`AutoProcessor.from_pretrained(path, max_pixels=..., min_pixels=...)` and `AutoTokenizer.from_pretrained(path)`,
and prompts through the processor's chat template with a system message. A full student, a merged LoRA student and
a student with ViCuR's cue-recovery module are checked here against the trained model, offline; the benchmark
datasets are the user's download.
"""

import pytest
import torch
from conftest import image_question_dataset, make_args, noise_image
from transformers import AutoProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

from trl_vaopd import VAOPDTrainer
from trl_vaopd.cue_recovery import has_cue_recovery, load_with_cue_recovery
from trl_vaopd.tiny_models import build_model


SYSTEM = "You are a helpful assistant."


def trained(processors, tmp_path, peft_config=None, cues=False, **overrides) -> VAOPDTrainer:
    processor = processors["qwen3_vl"]
    trainer = VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(tmp_path / "run", max_steps=1, learning_rate=1e-2, optim="adamw_torch", **overrides),
        train_dataset=image_question_dataset(cues=cues),
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.model.eval()
    return trainer


def framework_inputs(path) -> dict[str, torch.Tensor]:
    """One question with its image, prompted as lmms-eval's `qwen3_vl` model prompts it."""
    processor = AutoProcessor.from_pretrained(path, max_pixels=32 * 32 * 4, min_pixels=16 * 16)
    AutoTokenizer.from_pretrained(path)  # the framework loads it beside the processor
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What number is shown?"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[noise_image(3)], return_tensors="pt")


def framework_inputs_for(processors, tmp_path) -> dict[str, torch.Tensor]:
    """The same, from the processor the student was trained with."""
    processors["qwen3_vl"].save_pretrained(tmp_path / "processor")
    return framework_inputs(tmp_path / "processor")


def same_logits(loaded, trained_model, inputs) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained_model(**inputs).logits, rtol=1e-5, atol=1e-5)


def samples_avg_at_8(model, inputs) -> list[torch.Tensor]:
    """Eight samples at temperature 1, as avg@8 draws them."""
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, temperature=1.0, max_new_tokens=5, num_return_sequences=8)
    return list(out[:, inputs["input_ids"].size(1) :])


def test_a_full_student_loads_as_the_framework_loads_it(processors, tmp_path):
    trainer = trained(processors, tmp_path)
    trainer.save_model(str(tmp_path / "student"))
    inputs = framework_inputs(tmp_path / "student")
    loaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    same_logits(loaded, trainer.model, inputs)
    in_bf16 = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "student", dtype=torch.bfloat16).eval()
    assert len(samples_avg_at_8(in_bf16, inputs)) == 8


def test_a_merged_lora_student_loads_as_the_framework_loads_it(processors, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = trained(processors, tmp_path, peft_config=lora)
    inputs = framework_inputs_for(processors, tmp_path)
    with torch.no_grad():
        adapter_logits = trainer.model(**inputs).logits
    # The recipe of docs/evaluation.md: merge the adapter into the base, save the model and the processor
    trainer.model.merge_and_unload().save_pretrained(tmp_path / "merged")
    trainer.processing_class.save_pretrained(tmp_path / "merged")
    loaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, adapter_logits, rtol=1e-5, atol=1e-5)
    assert not any("lora_" in name for name, _ in loaded.named_parameters())


def test_a_student_with_the_cue_recovery_module_needs_its_loader(processors, tmp_path):
    trainer = trained(processors, tmp_path, cues=True, method="vicur")
    assert has_cue_recovery(trainer.model)
    trainer.save_model(str(tmp_path / "student"))
    inputs = framework_inputs(tmp_path / "student")
    # The framework's plain load drops the module: another model, which the checkpoint's config says
    plain = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    assert plain.config.cue_recovery["interval"] == 5 and not has_cue_recovery(plain)
    with torch.no_grad(), pytest.raises(AssertionError):
        torch.testing.assert_close(plain(**inputs).logits, trainer.model(**inputs).logits)
    # The recipe: load with the module, then hand the model to the framework in place of its own
    loaded = load_with_cue_recovery(tmp_path / "student", dtype=torch.float32).eval()
    assert type(loaded) is Qwen3VLForConditionalGeneration and has_cue_recovery(loaded)
    same_logits(loaded, trainer.model, inputs)
    in_bf16 = load_with_cue_recovery(tmp_path / "student", dtype=torch.bfloat16).eval()
    assert len(samples_avg_at_8(in_bf16, inputs)) == 8
