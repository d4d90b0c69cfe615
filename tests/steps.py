"""One real training step of `VAOPDTrainer` on the tiny models, and its check against the float64 reference."""

import pytest
import torch
from conftest import image_question_dataset, make_args
from reference import reference, rollouts_of

from trl_vaopd import VAOPDTrainer
from trl_vaopd.prefix_sharing import cache_keyword
from trl_vaopd.tiny_models import build_model


class Passes:
    """What a model's backbone computed inside the trainer's scoring and loss passes (generation excluded), counted by
    a forward pre-hook: the rollouts whose completion tokens a call ran (a full pass, or the continuation of a shared
    prompt), the prompts a shared-prompt call ran, the non-padding token positions of every call, the most
    rollouts one call held, and the calls."""

    def __init__(self, model):
        self.active = False
        self.rollouts = self.prompts = self.positions = self.max_rows = self.calls = 0
        model.base_model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if not self.active:
            return
        ids = kwargs["input_ids"]
        self.calls += 1
        self.positions += int(kwargs["attention_mask"][:, -ids.size(1) :].sum())
        if kwargs.get("use_cache") and kwargs.get(cache_keyword(module)) is None:
            self.prompts += ids.size(0)  # a shared prompt, whose completions run next on its cache
        else:
            self.rollouts += ids.size(0)
            self.max_rows = max(self.max_rows, ids.size(0))


def count_passes(trainer, *passes: Passes) -> None:
    """Turn the counters on while the trainer runs its scoring and loss passes (`_hidden_states`)."""
    hidden_states = trainer._hidden_states

    def counted(*args, **kwargs):
        for p in passes:
            p.active = True
        try:
            return hidden_states(*args, **kwargs)
        finally:
            for p in passes:
                p.active = False

    trainer._hidden_states = counted


def token_reward(completion_ids, **kwargs):
    """A verifiable reward with TRL's signature that varies within sibling groups: the completion's token ids summed,
    modulo 5 (`reward_of_tokens` is the same function of one completion, for the reference)."""
    return [reward_of_tokens(torch.tensor(ids)) for ids in completion_ids]


def reward_of_tokens(tokens: torch.Tensor) -> float:
    return float(int(tokens.sum()) % 5)


def run_one_step(processors, tmp_path, family="qwen3_vl", dataset=None, reward_funcs=None, **overrides):
    """One real `train()` step on the tiny pair of `family`: the trainer, the update of every parameter, and what the
    teacher's and the student's backbones computed outside generation (`Passes`)."""
    processor = processors[family]
    student = build_model(family, processor, "student", seed=0)
    teacher = build_model(family, processor, "teacher", seed=1)
    teacher_passes, student_passes = Passes(teacher), Passes(student)
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, **overrides),
        train_dataset=image_question_dataset(8) if dataset is None else dataset,
        processing_class=processor,
        reward_funcs=reward_funcs,
    )
    count_passes(trainer, teacher_passes, student_passes)
    # Read once the trainer is built: it may add parameters (the cue-recovery module)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    delta = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
    return trainer, delta, teacher_passes, student_passes


def cat(batches, key):
    """A per-rollout entry over micro-batches (per-row lists, such as the kept teacher states, are packed)."""
    return torch.cat([torch.cat(b[key]) if isinstance(b[key], list) else b[key] for b in batches])


def assert_update_is_minus_gradient(delta, student):
    # Per module, relative L2 error: an element-wise test would measure float32 rounding of `p_after - p_before`
    errors, norms = {}, {}
    for name, p in student.named_parameters():
        ref = p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        module = "vision" if ".visual." in name or "vision" in name else "language"
        errors[module] = errors.get(module, 0.0) + (delta[name] + ref).square().sum().item()
        norms[module] = norms.get(module, 0.0) + ref.square().sum().item()
    for module in errors:
        assert norms[module] > 0, f"no gradient reaches the {module} parameters"
        assert (errors[module] / norms[module]) ** 0.5 < 1e-3, (module, errors[module], norms[module])


def check_step_against_reference(processors, tmp_path, cues=None, rewards=False, **overrides):
    """One real `train()` step on the tiny Qwen3-VL pair: its update is minus the gradient of the float64 objective of
    the whole generation batch, and the per-token quantities it scored equal the reference's. With `cues` (picture ->
    cue) the dataset carries them and the reference's teacher reads them; with `rewards` the trainer gets
    `token_reward` and the reference mixes in GRPO's loss."""
    dataset = None if cues is None else image_question_dataset(8).add_column("cue", [cues[i] for i in range(8)])
    trainer, delta, teacher_passes, student_passes = run_one_step(
        processors, tmp_path, dataset=dataset, reward_funcs=[token_reward] if rewards else None, **overrides
    )
    processor = processors["qwen3_vl"]
    micro = trainer._buffered_inputs
    rows = rollouts_of(micro, processor.tokenizer)
    student = build_model("qwen3_vl", processor, "student", seed=0)
    teacher = build_model("qwen3_vl", processor, "teacher", seed=1)
    ref = reference(
        rows, student, teacher, processor, trainer.args, cues, reward_of=reward_of_tokens if rewards else None
    )
    ref["loss"].backward()
    assert_update_is_minus_gradient(delta, student)
    # GRPO's term is centred per group, so a mixed loss can sit near zero: a float32-sized absolute slack then
    assert trainer.state.log_history[0]["loss"] == pytest.approx(
        ref["loss"].item(), rel=1e-4, abs=1e-6 if rewards else 0
    )
    width = ref["mask"].size(1)
    torch.testing.assert_close(
        cat(micro, "vaopd_coefficients")[:, :width].double(), ref["coefficients"], rtol=1e-4, atol=1e-7
    )
    if trainer.args.vgs:
        assert torch.equal(cat(micro, "vgs_lp_mask")[:, :width], ref["lp"])
        torch.testing.assert_close(cat(micro, "vgs_gamma")[:, :width].double(), ref["gamma"])
    return trainer, ref, teacher_passes, student_passes
