"""The family table: every tiny model finds its entry, and each entry's facts hold on the real model class."""

import pytest
import torch

from trl_vaopd.families import FAMILIES, family_of
from trl_vaopd.prefix_sharing import backbone_of
from trl_vaopd.tiny_models import TINY_FAMILIES, build_model
from trl_vaopd.views import VIEW_NAMES


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


def test_qwen3_vl_moe_teacher_distils_into_a_qwen3_vl_student(processors, tmp_path):
    """A cross-family pair sharing a tokenizer and a processor trains one step, both models sharing their prompts."""
    from conftest import image_question_dataset, make_args
    from steps import Passes, count_passes

    from trl_vaopd import VAOPDTrainer

    processor = processors["qwen3_vl"]
    student = build_model("qwen3_vl", processor, "student", seed=0)
    teacher = build_model("qwen3_vl_moe", processors["qwen3_vl_moe"], "teacher", seed=1)
    teacher_passes, student_passes = Passes(teacher), Passes(student)
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, method="va_opd", learning_rate=1e-3),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
    )
    count_passes(trainer, teacher_passes, student_passes)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["loss"] > 0 and logs["va/mean"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert teacher_passes.prompts > 0 and student_passes.prompts > 0


@pytest.mark.parametrize("image_parts", [False, True], ids=["plain", "image-parts"])
@pytest.mark.parametrize("method", ["opd", "vicur"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_method_trains_one_step_on_each_family(processors, tmp_path, family, method, image_parts):
    """OPD and ViCuR (the cue teacher and the student's cue-recovery module) on each family, with plain-text prompts
    and with TRL's `{"type": "image"}` parts; VA-OPD is below, VGS in `test_trainer.py`. ViCuR's module is refused by
    name on a family without it."""
    from conftest import image_question_dataset, with_image_parts
    from steps import run_one_step

    dataset = image_question_dataset(8, cues=True)
    settings = dict(
        family=family,
        method=method,
        dataset=with_image_parts(dataset) if image_parts else dataset,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
    )
    if method == "vicur" and not FAMILIES[family].cue_recovery:
        with pytest.raises(ValueError, match=f"got a '{family}' model. Train without it"):
            run_one_step(processors, tmp_path, **settings)
        return
    trainer, delta, _, _ = run_one_step(processors, tmp_path, **settings)
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert any(d.abs().max() > 0 for n, d in delta.items() if "sink_" not in n)
    # ViCuR's module trains with the student (its output projection starts at zero, its input ones get no gradient)
    assert (method == "vicur") == any(d.abs().max() > 0 for n, d in delta.items() if "sink_cross_attns" in n)


def outside_the_table(processor, size: str, seed: int):
    """A tiny Idefics3 under a `model_type` the table does not know: a family outside it."""
    model = build_model("idefics3", processor, size, seed=seed)
    model.config.model_type = "outside_the_table"
    return model


def test_a_family_outside_the_table_trains_on_full_passes_and_refuses_the_module(processors, tmp_path):
    from conftest import image_question_dataset, make_args
    from steps import Passes, count_passes

    from trl_vaopd import VAOPDTrainer
    from trl_vaopd.cue_recovery import has_cue_recovery

    processor = processors["idefics3"]
    student, teacher = outside_the_table(processor, "student", 0), outside_the_table(processor, "teacher", 1)
    assert family_of(student) is None and not has_cue_recovery(student)
    teacher_passes = Passes(teacher)
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, method="va_opd", learning_rate=1e-3),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
    )
    count_passes(trainer, teacher_passes)
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert teacher_passes.rollouts == 2 * 8 and teacher_passes.prompts == 0  # full passes, no shared prompt
    with pytest.raises(ValueError, match="got a 'outside_the_table' model. Train without it"):
        VAOPDTrainer(
            model=outside_the_table(processor, "student", 0),
            teacher_model=teacher,
            args=make_args(tmp_path, method="vicur"),
            train_dataset=image_question_dataset(8, cues=True),
            processing_class=processor,
        )


@pytest.mark.parametrize("image_parts", [False, True], ids=["plain", "image-parts"])
@pytest.mark.parametrize("view", VIEW_NAMES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_va_opd_trains_under_every_view_on_each_family(processors, tmp_path, family, view, image_parts):
    """One VA-OPD step under each counterfactual view, with plain-text prompts and with TRL's `{"type": "image"}`
    parts: the pixel views keep each processor's image layout, the "drop" view re-tokenizes each prompt without its
    images, left-padding two prompts of different lengths in one teacher call. Two groups of K=2 rollouts and 3
    completion tokens keep the 112 steps cheap."""
    from conftest import image_question_dataset, with_image_parts
    from steps import run_one_step

    dataset = image_question_dataset(2)
    trainer, delta, teacher, student = run_one_step(
        processors,
        tmp_path,
        family=family,
        method="va_opd",
        counterfactual_view=view,
        dataset=with_image_parts(dataset) if image_parts else dataset,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=3,
        learning_rate=1e-3,
    )
    logs = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["loss"] > 0
    assert logs["va/mean"] > 0
    assert any(d.abs().max() > 0 for d in delta.values())
    assert teacher.rollouts == 2 * 4 and student.rollouts == 4  # the teacher scores both views of each rollout
