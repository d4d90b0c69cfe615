"""Instruments of the VA-OPD benchmark: exclusive phase times (wall and CPU), teacher-forward counts, per-step records.

Everything here patches one trainer instance (or, for the chunked divergence kernel, its class inside the forked run
process that owns it): it is a measuring device, not part of the library.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from trl_vaopd.prefix_sharing import cache_keyword


__all__ = ["PHASE_GROUPS", "PhaseClock", "StepRecorder", "instrument"]

#: How the fine phases add up to the split the README reports. Anything outside every phase is "other" (data
#: loading, the processor's second pass over the images, padding, logging, the scheduler).
PHASE_GROUPS: dict[str, tuple[str, ...]] = {
    "generation": ("generation",),
    "teacher": ("teacher_forward", "teacher_logprob", "teacher_scoring", "counterfactual_view"),
    "student": ("student_forward", "backward"),
    "objective": ("objective_forward", "objective_backward", "va_bookkeeping", "loss_glue"),
    "optimizer": ("optimizer",),
}


class PhaseClock:
    """Exclusive time per phase, on two clocks: wall time and this process's CPU time (all its threads).

    A nested phase's time is not also counted in its parent. CPU time is what the work costs; on a machine shared with
    other jobs it is far steadier than wall time (with one torch thread it equals wall time on an idle machine).
    """

    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [name, wall time and cpu time the phase last resumed]

    def now(self) -> tuple[float, float]:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def _credit(self, frame: list, now: tuple[float, float]) -> None:
        self.wall[frame[0]] += now[0] - frame[1]
        self.cpu[frame[0]] += now[1] - frame[2]
        frame[1], frame[2] = now

    def push(self, name: str) -> None:
        now = self.now()
        if self._stack:
            self._credit(self._stack[-1], now)
        self._stack.append([name, *now])

    def pop(self) -> None:
        now = self.now()
        self._credit(self._stack.pop(), now)
        if self._stack:
            self._stack[-1][1], self._stack[-1][2] = now

    def inside(self, name: str) -> bool:
        return any(frame[0] == name for frame in self._stack)

    @contextmanager
    def phase(self, name: str):
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def wrap(self, fn, name: str):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return wrapped

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        """(wall, cpu) phase totals since the last call, then reset (phases still open keep running)."""
        now = self.now()
        for frame in self._stack:
            self._credit(frame, now)
        out = dict(self.wall), dict(self.cpu)
        self.wall, self.cpu = defaultdict(float), defaultdict(float)
        return out


class StepRecorder(TrainerCallback):
    """Time of every optimizer step and its phase split.

    Without a `turn`, a step runs from the end of the previous one to its own end (data loading, generation, forward,
    backward, optimizer). With a `turn` (a pipe to the scheduler of a group of runs), each step first waits for "go"
    and is timed from it, then answers "done".
    """

    def __init__(self, clock: PhaseClock, probe: dict, turn=None):
        self.clock, self.probe, self.turn = clock, probe, turn
        self.steps: list[dict] = []
        self._last = None

    def _start(self):
        if self.turn is not None and self.turn.recv() != "go":
            raise RuntimeError("expected 'go' from the scheduler")
        self.clock.take()  # nothing runs while waiting: drop it
        self._reset_counters()
        self._last = self.clock.now()

    def on_train_begin(self, args, state, control, **kwargs):
        self._start()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.clock.push("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.clock.pop()

    def on_step_end(self, args, state, control, **kwargs):
        now = self.clock.now()
        wall, cpu = self.clock.take()
        self.steps.append(
            {
                "wall": {"step_s": now[0] - self._last[0], "phases_s": wall},
                "cpu": {"step_s": now[1] - self._last[1], "phases_s": cpu},
                "teacher_rows": self.probe["teacher_rows"],
                "teacher_prompt_rows": self.probe["teacher_prompt_rows"],
                "teacher_positions": self.probe["teacher_positions"],
                "student_rows": self.probe["student_rows"],
                "student_prompt_rows": self.probe["student_prompt_rows"],
                "student_positions": self.probe["student_positions"],
                "teacher_calls": self.probe["teacher_calls"],
                "teacher_max_rows": self.probe["teacher_max_rows"],
                "rollouts": self.probe["rollouts"],
                "prompt_tokens": self.probe["prompt_tokens"],
                "completion_lengths": sorted(set(self.probe["completion_lengths"])),
            }
        )
        if self.turn is not None:
            self.turn.send("done")
            if state.global_step >= state.max_steps:
                return
        self._start()

    def _reset_counters(self):
        self.probe.update(
            teacher_rows=0,
            teacher_prompt_rows=0,
            teacher_positions=0,
            teacher_calls=0,
            teacher_max_rows=0,
            student_rows=0,
            student_prompt_rows=0,
            student_positions=0,
            rollouts=0,
            prompt_tokens=0,
            completion_lengths=[],
        )


def _backbone_hooks(module: torch.nn.Module, clock: PhaseClock, name: str, on_call=None, skip_inside=None):
    timed: list[bool] = []

    def pre(mod, args, kwargs):
        # Inside generation the student's forwards belong to generation: no phase (and no CUDA sync per token), no count
        timed.append(not (skip_inside and clock.inside(skip_inside)))
        if timed[-1]:
            if on_call is not None:
                on_call(kwargs)
            clock.push(name)

    def post(mod, args, kwargs, output):
        if timed.pop():
            clock.pop()

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)


def instrument(trainer, student, teacher, clock: PhaseClock, is_vaopd: bool, turn=None) -> StepRecorder:
    """Patch `trainer` (and the kernels, in this process) so every phase is timed and every teacher row counted."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from trl_vaopd.chunked import _VGSDivergences

    probe: dict = {}
    recorder = StepRecorder(clock, probe, turn)
    recorder._reset_counters()

    # Forwards, counted at the backbones: every scoring path (TRL's loss, VA-OPD's scoring) and every student pass of
    # the loss goes through them. A call that runs completion tokens (a full pass, or the continuation of a shared
    # prompt) counts its rows as rollouts scored; a shared prompt's own call counts as prompt rows; every call adds its
    # non-padding token positions
    def counter(model: str, backbone: torch.nn.Module):
        keyword = cache_keyword(backbone)

        def count(kwargs):
            ids = kwargs["input_ids"]
            shared_prompt = kwargs.get("use_cache") and kwargs.get(keyword) is None
            probe[f"{model}_prompt_rows" if shared_prompt else f"{model}_rows"] += int(ids.size(0))
            probe[f"{model}_positions"] += int(kwargs["attention_mask"][:, -ids.size(1) :].sum())
            if model == "teacher":
                probe["teacher_calls"] += 1
                if not shared_prompt:  # the rollouts a call holds at once (a shared prompt's call holds fewer)
                    probe["teacher_max_rows"] = max(probe["teacher_max_rows"], int(ids.size(0)))

        return count

    _backbone_hooks(teacher.base_model, clock, "teacher_forward", on_call=counter("teacher", teacher.base_model))
    _backbone_hooks(
        student.base_model,
        clock,
        "student_forward",
        on_call=counter("student", student.base_model),
        skip_inside="generation",
    )

    generate = trainer._generate

    def timed_generate(prompts):
        with clock.phase("generation"):
            out = generate(prompts)
        prompt_ids, completion_ids = out[0], out[1]
        probe["rollouts"] += len(completion_ids)
        probe["prompt_tokens"] += sum(len(p) for p in prompt_ids)
        probe["completion_lengths"].extend(len(c) for c in completion_ids)
        return out

    trainer._generate = timed_generate
    trainer._generate_and_score_completions = clock.wrap(trainer._generate_and_score_completions, "rollout_prep")
    trainer.compute_loss = clock.wrap(trainer.compute_loss, "loss_glue")
    trainer._clip_grad_norm = clock.wrap(trainer._clip_grad_norm, "optimizer")
    trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "backward")

    # The divergence kernels (TRL's, and VGS's): forward and backward, patched on the class in this process only
    for kernel in (ChunkedDivergenceFunction, _VGSDivergences):
        for method, name in (("forward", "objective_forward"), ("backward", "objective_backward")):
            setattr(kernel, method, staticmethod(clock.wrap(getattr(kernel, method), name)))

    if is_vaopd:
        import trl_vaopd.trainer as vaopd_module

        # VA-OPD's own steps. A name the trainer no longer has is skipped: its time then counts in its caller's phase
        for method, name in (
            ("_score_views", "teacher_scoring"),
            ("_counterfactual_inputs", "counterfactual_view"),
            ("_sibling_groups", "va_bookkeeping"),
            ("_log_va_metrics", "va_bookkeeping"),
            ("_vgs_token_settings", "va_bookkeeping"),
        ):
            if hasattr(trainer, method):
                setattr(trainer, method, clock.wrap(getattr(trainer, method), name))
        for function, name in (
            ("visual_advantage", "va_bookkeeping"),
            ("rollout_weights", "va_bookkeeping"),
            ("uniform_rollout_weights", "va_bookkeeping"),
            ("token_coefficients", "va_bookkeeping"),
            ("high_va_mask", "va_bookkeeping"),
            ("token_logprobs", "teacher_logprob"),
            ("vaopd_loss", "objective_forward"),
            ("vgs_token_loss", "objective_forward"),
            ("vgs_loss", "objective_forward"),
        ):
            if hasattr(vaopd_module, function):
                setattr(vaopd_module, function, clock.wrap(getattr(vaopd_module, function), name))

        # The teacher's hidden states kept for the whole generation batch (VGS: of both views): the extra memory
        outer = trainer._generate_and_score_completions
        keys = (vaopd_module._TEACHER_HIDDEN, vaopd_module._TEACHER_CF_HIDDEN)

        def keep_cache_size(inputs):
            batch = outer(inputs)
            # Per-rollout tensors (the valid positions only) or one padded tensor
            kept = [t for k in keys for t in (batch[k] if isinstance(batch.get(k), list) else [batch.get(k)])]
            size = sum(t.numel() * t.element_size() for t in kept if isinstance(t, torch.Tensor))
            probe["teacher_cache_bytes"] = max(probe.get("teacher_cache_bytes", 0), size)
            return batch

        trainer._generate_and_score_completions = keep_cache_size

    trainer.add_callback(recorder)
    recorder.probe_ref = probe
    return recorder
