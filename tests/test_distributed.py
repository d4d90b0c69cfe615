"""Scale-out: real multi-process VA-OPD runs on CPU (two gloo ranks) under `accelerate launch`.

- DDP: rollout weights, coefficients (and VGS's language-prior mask and gamma), the logged loss and the parameter update
  of a 2-process step equal the objective (VA-OPD, VA-OPD + VGS) recomputed in float64 from full logits over the whole
  generation batch (`tests/reference.py`), with a prompt's siblings split across ranks and micro-batches;
- DeepSpeed ZeRO-3 with a full-parameter student under VGS: the same equality, student and teacher both sharded;
- DeepSpeed ZeRO-3 with a LoRA student: the sharded teacher's visual advantages equal an unsharded teacher's on the
  same rollouts, and the adapter (only) trains, its update again minus the reference gradient;
- the example script with its YAML recipe, alone and under each accelerate config (DDP, ZeRO-2, ZeRO-3);
- QLoRA (`--load_in_4bit --use_peft`) through the example script, and two-view scoring of rollouts from any generator (the vLLM guard lives in
  test_bad_input.py).

Every launch builds tiny models locally (`trl_vaopd.tiny_models`); nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cue, noise_image, pad_output_head
from reference import Rollout, reference, rollout_key, rollouts_of
from steps import reward_of_tokens

from trl_vaopd.cue_recovery import add_cue_recovery
from trl_vaopd.objective import visual_advantage
from trl_vaopd.tiny_models import build_model, build_processor, build_tokenizer


REPO = Path(__file__).resolve().parents[1]
RUN_SCRIPT = REPO / "tests" / "scripts" / "vaopd_distributed_run.py"
EXAMPLE = REPO / "examples" / "train_vaopd.py"
ACCELERATE_CONFIGS = REPO / "examples" / "accelerate_configs"
TINY_RECIPE = REPO / "examples" / "recipes" / "tiny_cpu.yaml"
# LoRA of the helper script's `--lora` run
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
VA_METRICS = ("va/mean", "va/top10_share", "va/high_group_share", "weights/max", "weights/min", "kl/high", "kl/low")
VGS_METRICS = ("vgs/standard", "vgs/visual", "vgs/language", "vgs/lp_share", "vgs/vds", "vgs/lp_threshold")


# ---------------------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list, cwd: Path = REPO, timeout: int = 600) -> str:
    """Run a command on CPU, offline; fail with the tail of its output unless it exits 0. Returns the output."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "MASTER_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}"
    return output


def accelerate_launch(*args, config: str | None = None) -> list:
    """`accelerate launch` with two processes and no mixed precision (CPU), from a config file or `--multi_gpu`."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    setup = ["--config_file", ACCELERATE_CONFIGS / config] if config else ["--multi_gpu"]
    return [
        *launcher,
        *setup,
        "--num_processes",
        2,
        "--mixed_precision",
        "no",
        "--main_process_port",
        free_port(),
        *args,
    ]


def launch_run(tmp_path: Path, *args, config: str | None = None) -> dict:
    out = tmp_path / "run.pt"
    run(accelerate_launch(RUN_SCRIPT, "--out", out, "--output_dir", tmp_path / "out", *args, config=config))
    return torch.load(out, weights_only=False)


# ---------------------------------------------------------------------------------------------------------- reference
def load_student(before: dict[str, torch.Tensor], processor, lora: bool, padded: bool) -> torch.nn.Module:
    """The student as it was before the run's step: the tiny model (+ the same LoRA) holding the run's weights."""
    student = build_model("qwen3_vl", processor, "student", seed=0)
    if padded:
        student = pad_output_head(student, 5, seed=2)
    if any(".sink_" in name for name in before):
        student = add_cue_recovery(student, interval=5)
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(**LORA))
    params = dict(student.named_parameters())
    assert params.keys() == before.keys()
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(before[name])
    return student


def run_reference(result: dict, lora: bool = False) -> dict:
    """The objective and its gradient over the run's whole generation batch, in sampling order (rank 0's rollouts,
    then rank 1's), from `tests/reference.py` (float64, full logits, unsharded teacher)."""
    processor = build_processor("qwen3_vl", build_tokenizer())
    rows = []
    for rank, data in enumerate(result["ranks"]):
        (scored,) = data["scored"]  # one generation per run
        rows += rollouts_of([scored], processor.tokenizer, rank)
    student = load_student(result["before"], processor, lora, result["pad_heads"])
    teacher = build_model("qwen3_vl", processor, "teacher", seed=1)
    if result["pad_heads"]:
        teacher = pad_output_head(teacher, 11, seed=3)
    # The run's own VA (compared with the reference's by `assert_va_matches`) sets the weights: see `reference`
    width = max(row.completion.numel() for row in rows)
    run_va = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        (scored,) = result["ranks"][row.rank]["scored"]
        j, n = row.index, row.completion.numel()
        va = visual_advantage(
            scored["logp_original"][j], scored["logp_counterfactual"][j], scored["completion_mask"][j]
        )
        run_va[i, :n] = va[:n]
    cues = {i: cue(i) for i in range(16)} if result["cues"] else None
    settings = SimpleNamespace(**result["settings"])
    reward_of = reward_of_tokens if result["rewards"] else None
    ref = reference(rows, student, teacher, processor, settings, cues, va=run_va, reward_of=reward_of)
    ref["loss"].backward()
    ref["loss"] = ref["loss"].item()
    ref["grads"] = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in student.named_parameters()}
    return ref


# ---------------------------------------------------------------------------------------------------------- checks
def assert_batch_is_complete_sibling_groups(rows: list[Rollout], split_across_ranks: bool) -> None:
    pictures = [row.picture for row in rows]
    groups = [pictures[i : i + 4] for i in range(0, len(pictures), 4)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == len(groups), pictures
    spans = [{row.rank for row in rows[i : i + 4]} for i in range(0, len(rows), 4)]
    assert any(len(s) > 1 for s in spans) == split_across_ranks, spans


def assert_va_matches(result: dict, ref: dict, atol: float = 1e-5) -> None:
    """The trainer's per-token VA (its teacher's log-probs of both views, as scored in the run) equals the reference."""
    for i, row in enumerate(ref["rows"]):
        (scored,) = result["ranks"][row.rank]["scored"]
        j, n = row.index, row.completion.numel()
        trainer_va = visual_advantage(
            scored["logp_original"][j], scored["logp_counterfactual"][j], scored["completion_mask"][j]
        )
        assert scored["completion_mask"][j].sum() == n
        torch.testing.assert_close(trainer_va[:n].double(), ref["va"][i, :n], rtol=0, atol=atol)
    assert ref["va"].max() > 0


def assert_per_token_values_match(result: dict, ref: dict) -> None:
    """Every rollout the loss consumed (shuffled micro-batches of every rank) carries the reference's coefficients,
    and for VGS its language-prior mask and gamma."""
    checks = [("vaopd_coefficients", "coefficients")]
    if "lp" in ref:
        checks += [("vgs_lp_mask", "lp"), ("vgs_gamma", "gamma")]
    processor_tokenizer = build_tokenizer()
    expected: dict[tuple, list[int]] = {}
    for i, row in enumerate(ref["rows"]):
        expected.setdefault(rollout_key(row), []).append(i)
    consumed = 0
    for data in result["ranks"]:
        for batch in data["micro_batches"]:
            for row in rollouts_of([batch], processor_tokenizer):
                n = row.completion.numel()

                def matches(i, row=row, n=n, batch=batch):
                    return all(
                        torch.allclose(
                            batch[name][row.index, :n].double(), ref[field][i, :n].double(), rtol=1e-4, atol=1e-8
                        )
                        for name, field in checks
                    )

                assert any(matches(i) for i in expected[rollout_key(row)]), rollout_key(row)
                consumed += 1
    assert consumed == len(ref["rows"])
    # Weights of each prompt's siblings sum to one over the whole generation batch
    pictures = torch.tensor([row.picture for row in ref["rows"]])
    for picture in pictures.unique():
        assert ref["weights"][pictures == picture].sum().item() == pytest.approx(1.0)


def assert_update_is_minus_gradient(result: dict, ref: dict, lr: float, names=None) -> None:
    """SGD with lr and no clipping: after - before == -lr * dL/dtheta, for every (trainable) parameter."""
    eps = torch.finfo(torch.float32).eps
    names = names if names is not None else result["before"].keys()
    total_err, total_norm = 0.0, 0.0
    for name in names:
        before, after = result["before"][name].double(), result["after"][name].double()
        expected = -lr * ref["grads"][name]
        # float32 storage rounds the update at the parameter's own scale
        atol = 4 * eps * before.abs().max().item() + 1e-4 * expected.abs().max().item()
        torch.testing.assert_close(
            after - before, expected, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )
        total_err += (after - before - expected).square().sum().item()
        total_norm += expected.square().sum().item()
    assert total_norm > 0
    assert (total_err / total_norm) ** 0.5 < 1e-4


def assert_positions_counted(result: dict, per_device: int, view: str, k: int = 4) -> dict[str, int]:
    """The token positions each process's teacher and student backbones ran in the scoring and loss passes: each
    piece of a sibling group a call holds runs its prompt once per view, and every completion runs once per view.

    A teacher call holds up to a micro-batch of a process's rollouts, cut along sibling groups: a group split across
    processes is one piece on each, a group larger than a micro-batch is cut into pieces of a micro-batch. A student call
    is one micro-batch. Returns the prompts each model ran, over all processes.
    """
    counted = {"teacher": 0, "student": 0}
    for rank, data in enumerate(result["ranks"]):
        (scored,) = data["scored"]
        n = scored["prompt_mask"].size(0)
        group_starts = [i for i in range(n) if i == 0 or (rank * n + i) % k == 0]
        pieces = [
            start
            for s, e in zip(group_starts, [*group_starts[1:], n], strict=True)
            for start in range(s, e, per_device)
        ]
        teacher_masks = [
            scored["prompt_mask"],
            scored["counterfactual_prompt_mask" if view == "drop" else "prompt_mask"],
        ]
        completions = int(scored["completion_mask"].sum())
        teacher = data["passes"]["teacher"]
        assert teacher["prompts"] == 2 * len(pieces)
        assert teacher["positions"] == sum(int(m[pieces].sum()) + completions for m in teacher_masks)
        assert teacher["max_rows"] <= per_device
        student, prompts, positions = data["passes"]["student"], 0, 0
        for batch in data["micro_batches"]:
            ids = batch["prompt_ids"]
            starts = [i for i in range(ids.size(0)) if i == 0 or not torch.equal(ids[i], ids[i - 1])]
            masks = [batch["prompt_mask"]]
            if "vgs_gamma" in batch:  # VGS: the student runs the counterfactual view too
                masks.append(batch["counterfactual_prompt_mask" if view == "drop" else "prompt_mask"])
            prompts += len(masks) * len(starts)
            positions += sum(int(m[starts].sum()) + int(batch["completion_mask"].sum()) for m in masks)
        assert (student["prompts"], student["positions"]) == (prompts, positions)
        counted["teacher"] += teacher["prompts"]
        counted["student"] += student["prompts"]
    return counted


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "method,rewards",
    [(["va_opd"], False), (["va_opd", "vgs"], False), (["va_opd", "vgs"], True)],
    ids=["va_opd", "va_opd+vgs", "va_opd+vgs+grpo"],
)
def test_two_process_step_equals_method_objective_on_whole_generation_batch(tmp_path, method, rewards):
    # 2 rollouts per micro-batch x 3 accumulation steps x 2 processes = 12 rollouts = 3 prompts x 4 siblings: the
    # middle prompt's siblings sit on both ranks, the others span micro-batches of one rank. With rewards, the VGS
    # paper's mix: 0.7 GRPO + 0.3 distillation, advantages over sibling groups split across ranks
    view = "drop" if "vgs" in method else "pixelate"  # VGS as the paper runs it, without the image
    mix = ["--rewards", "--distillation_weight", "0.3"] if rewards else []
    result = launch_run(
        tmp_path, "--per_device", "2", "--accumulation", "3", "--method", *method, "--view", view, *mix
    )
    assert result["world_size"] == 2 and result["distributed_type"] == "DistributedType.MULTI_CPU"
    ref = run_reference(result)
    assert_batch_is_complete_sibling_groups(ref["rows"], split_across_ranks=True)
    assert len({row.completion.numel() for row in ref["rows"]}) > 1  # varied lengths: masks matter
    assert_va_matches(result, ref)
    assert_per_token_values_match(result, ref)
    assert ref["weights"].max() > ref["weights"].min()  # not uniform: the weighting matters here
    logs = result["log_history"][0]
    assert logs["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6 if rewards else 0)
    assert_update_is_minus_gradient(result, ref, lr=1.0)
    if rewards:
        assert ref["grpo"]["advantages"].abs().sum() > 0
        by_rollout = dict(zip(map(rollout_key, ref["rows"]), ref["grpo"]["advantages"].tolist(), strict=True))
        tokenizer = build_tokenizer()
        for data in result["ranks"]:  # every rollout the loss consumed, on both ranks
            for batch in data["micro_batches"]:
                for row, advantage in zip(rollouts_of([batch], tokenizer), batch["grpo_advantages"], strict=True):
                    assert advantage.item() == pytest.approx(by_rollout[rollout_key(row)], rel=1e-5, abs=1e-6)
        assert logs["loss/policy"] == pytest.approx(ref["grpo"]["loss"].item(), rel=1e-4, abs=1e-6)
        assert logs["reward"] == pytest.approx(ref["grpo"]["rewards"].mean().item())
    for key in VA_METRICS + (VGS_METRICS if "vgs" in method else ()):
        assert key in logs, key
    assert logs["weights/max"] == pytest.approx(ref["weights"].max().item(), rel=1e-4)
    assert logs["weights/min"] == pytest.approx(ref["weights"].min().item(), rel=1e-4)
    # Micro-batches of 2 hold pieces of 2 siblings: each of the 6 pieces runs its prompt once per view and pass
    views = 2 if "vgs" in method else 1
    assert assert_positions_counted(result, per_device=2, view=view) == {"teacher": 2 * 6, "student": views * 6}


def test_two_processes_run_each_piece_of_a_split_group_once_per_view(tmp_path):
    # 6 rollouts per process, 3 prompts x 4 siblings: the middle prompt's siblings sit on both ranks, two on each. A
    # teacher call holds one view of a process's 6 rollouts: each group's prompt once per view and process it sits on,
    # so the split group costs one extra prompt pass per view (the student's one micro-batch per process, one more)
    result = launch_run(tmp_path, "--per_device", "6", "--accumulation", "1")
    ref_rows = rollouts_of([result["ranks"][r]["scored"][0] for r in range(2)], build_tokenizer())
    assert [row.picture for row in ref_rows][4:8] == [ref_rows[4].picture] * 4  # the group split across ranks
    assert assert_positions_counted(result, per_device=6, view="pixelate") == {
        "teacher": 2 * (3 + 1),
        "student": 3 + 1,
    }


@pytest.mark.parametrize("method", [["va_opd"], ["va_opd", "vgs"]], ids=["va_opd", "va_opd+vgs"])
def test_zero3_step_with_padded_heads_equals_the_objective_over_the_tokenizer(tmp_path, method):
    # Full-parameter student, student and teacher both sharded, their heads padded to different sizes: the gradient of
    # the divergence kernels reaches the sharded output head through the tokenizer's rows only
    result = launch_run(
        tmp_path, "--per_device", "2", "--accumulation", "3", "--method", *method, "--pad_heads",
        config="deepspeed_zero3.yaml",
    )  # fmt: skip
    assert result["world_size"] == 2 and result["distributed_type"] == "DistributedType.DEEPSPEED"
    ref = run_reference(result)
    assert_va_matches(result, ref)
    assert_per_token_values_match(result, ref)
    assert result["log_history"][0]["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert_update_is_minus_gradient(result, ref, lr=1.0)
    head = ref["grads"]["lm_head.weight"]
    assert head[:-5].abs().sum() > 0 and not head[-5:].any()


@pytest.mark.parametrize(
    "config,aggregation",
    [(None, "response_mean"), ("deepspeed_zero3.yaml", "token_mean")],
    ids=["ddp-response_mean", "zero3-token_mean"],
)
def test_vicur_with_va_opd_and_vgs_equals_its_objective_in_two_processes(tmp_path, config, aggregation):
    # The cue teacher in every view, the student's cue-recovery module (trained from its identity start), VA-OPD's
    # coefficients and VGS's terms, siblings split across ranks, student and teacher sharded under ZeRO-3; token-mean
    # normalises by the tokens of both ranks' rollouts
    result = launch_run(
        tmp_path, "--per_device", "2", "--accumulation", "3", "--method", "va_opd", "vgs", "vicur",
        "--cues", "--cue_recovery", "--view", "drop", "--loss_aggregation", aggregation, config=config,
    )  # fmt: skip
    assert result["settings"]["loss_aggregation"] == aggregation
    ref = run_reference(result)
    assert_batch_is_complete_sibling_groups(ref["rows"], split_across_ranks=True)
    assert_va_matches(result, ref)
    assert_per_token_values_match(result, ref)
    assert result["log_history"][0]["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert_update_is_minus_gradient(result, ref, lr=1.0)
    module = [n for n in result["before"] if ".sink_" in n]
    assert module and any(not torch.equal(result["before"][n], result["after"][n]) for n in module)


@pytest.fixture(scope="module")
def zero3_lora_run(tmp_path_factory):
    """One ZeRO-3 run with a LoRA student, shared by the two tests below, and its unsharded float64 reference."""
    tmp_path = tmp_path_factory.mktemp("zero3_lora")
    result = launch_run(tmp_path, "--per_device", "2", "--accumulation", "3", "--lora", config="deepspeed_zero3.yaml")
    return result, run_reference(result, lora=True)


def test_zero3_sharded_teacher_gives_the_unsharded_visual_advantage(zero3_lora_run):
    result, ref = zero3_lora_run  # the reference scores the run's rollouts with an unsharded teacher
    assert result["world_size"] == 2 and result["distributed_type"] == "DistributedType.DEEPSPEED"
    # TRL's prepare_deepspeed partitioned the teacher: each of the 2 processes holds about half of it
    sharding = result["teacher_sharding"]
    assert sharding["local_numel"] < 0.6 * sharding["numel"], sharding
    assert torch.isfinite(torch.tensor(result["log_history"][0]["loss"]))
    assert_batch_is_complete_sibling_groups(ref["rows"], split_across_ranks=True)
    assert_va_matches(result, ref)
    assert_per_token_values_match(result, ref)


def test_lora_student_with_zero3_teacher_trains_the_adapter_only(zero3_lora_run):
    result, ref = zero3_lora_run
    assert result["trainable"] and all("lora_" in name for name in result["trainable"])
    changed = {n for n in result["before"] if not torch.equal(result["before"][n], result["after"][n])}
    assert changed == set(result["trainable"])  # every adapter matrix moved, no base weight did
    # The sharded step is minus the gradient of L over the whole generation batch, as without sharding
    assert result["log_history"][0]["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert_update_is_minus_gradient(result, ref, lr=1.0, names=result["trainable"])


# ---------------------------------------------------------------------------------------------------------- example
def printed_summary(output: str) -> dict[str, float]:
    """The metrics `examples/train_vaopd.py` prints at the end of a run."""
    assert " finished after" in output, output[-4000:]
    tail = output[output.rindex(" finished after") :]
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\S+)\s+(\S+)$", tail, re.MULTILINE)}


def assert_sane_summary(summary: dict[str, float]) -> None:
    for key in ("loss", *VA_METRICS):
        assert key in summary and torch.isfinite(torch.tensor(summary[key])), (key, summary)
    assert summary["loss"] > 0 and summary["va/mean"] > 0
    assert 0 < summary["weights/min"] <= 0.25 <= summary["weights/max"] < 1


def load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_vaopd_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_example_tiny_flag_runs_the_builtin_tiny_run(tmp_path):
    # From a scratch directory (it writes under ./trl_vaopd_outputs); without arguments the script runs the demo,
    # whose pipeline tests/test_demo.py covers
    output = run([sys.executable, EXAMPLE, "--tiny"], cwd=tmp_path)
    assert "va_opd finished after 4 steps" in output
    assert_sane_summary(printed_summary(output))
    assert (tmp_path / "trl_vaopd_outputs" / "tiny-vaopd").is_dir()


@pytest.mark.parametrize(
    "launcher, method",
    [
        ("python", ["va_opd"]),
        ("multi_gpu.yaml", ["va_opd"]),
        ("deepspeed_zero2.yaml", ["va_opd"]),
        ("deepspeed_zero3.yaml", ["va_opd"]),
        ("multi_gpu.yaml", ["vgs"]),
        ("deepspeed_zero3.yaml", ["vgs"]),  # with the VGS paper's GRPO mix, from the command line
        ("python", ["va_opd", "vicur"]),  # the tiny rows carry a cue; the student gets the cue-recovery module
    ],
)
def test_example_with_tiny_recipe(tmp_path, launcher, method):
    args = [EXAMPLE, "--config", TINY_RECIPE, "--output_dir", tmp_path / "out", "--method", *method]
    if "vgs" in method:
        args += ["--counterfactual_view", "drop"]  # VGS as its paper runs it
    rewards = launcher == "deepspeed_zero3.yaml" and method == ["vgs"]
    if rewards:
        args += ["--reward_funcs", "accuracy", "--distillation_weight", "0.3"]
    if launcher == "python":
        output = run([sys.executable, *args])
    else:
        output = run(accelerate_launch(*args, config=launcher))
        # Both processes trained: each logs its own progress bar, the main process alone prints the summary
        assert output.count(" finished after") == 1
    assert f"{' + '.join(method)} finished after 2 steps" in output
    summary = printed_summary(output)
    assert_sane_summary(summary)
    if "vgs" in method:
        assert {"vgs/standard", "vgs/visual", "vgs/language", "vgs/lp_share"} <= summary.keys()
    if rewards:
        assert {"reward", "loss/distillation", "loss/policy"} <= summary.keys()


def test_paper_recipe_parses_to_the_published_settings():
    example = load_example()
    # The recipe asks for bf16, which a CPU-only machine refuses: only the precision is overridden here
    script_args, args, model_args = example.parse_args(
        ["--config", str(REPO / "examples/recipes/qwen3_vl_8b_to_2b_geometry3k.yaml"), "--bf16", "false", "--use_cpu"]
    )
    assert (model_args.model_name_or_path, args.teacher_model_name_or_path) == (
        "Qwen/Qwen3-VL-2B-Instruct",
        "Qwen/Qwen3-VL-8B-Instruct",
    )
    assert script_args.dataset_name == "geometry3k" and not script_args.tiny
    assert (script_args.image_min_pixels, script_args.image_max_pixels) == (262144, 4194304)
    # 16 prompts x 4 responses per step on 8 GPUs, no accumulation
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 16 * args.num_generations == 64
    expected = dict(
        num_generations=4, gradient_accumulation_steps=1, num_train_epochs=5, learning_rate=1e-6, adam_beta1=0.9,
        adam_beta2=0.95, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=0.05, max_grad_norm=1.0,
        temperature=0.7, top_p=0.95, max_completion_length=4096, beta=1.0, divergence_temperature=1.0,
        counterfactual_view="pixelate", pixelate_ratio=0.1, va_weight_temperature=1.0, va_eps=1e-6,
        va_high_fraction=0.2, va_high_weight=0.5, rollout_weighting=True, token_grouping=True,
    )  # fmt: skip
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.optim == "adamw_torch" and model_args.dtype == "bfloat16"


def test_vicur_recipe_parses_to_the_papers_settings():
    example = load_example()
    script_args, args, model_args = example.parse_args(
        ["--config", str(REPO / "examples/recipes/qwen3_vl_2b_vicur_geometry3k.yaml"), "--bf16", "false", "--use_cpu"]
    )
    # Self-distillation: the teacher is the student's initial weights; 1 rollout per prompt, 128 per step on 8 GPUs
    assert model_args.model_name_or_path == args.teacher_model_name_or_path == "Qwen/Qwen3-VL-2B-Instruct"
    assert args.method == ["vicur"] and args.use_cues and args.cue_recovery and args.cue_column == "cue"
    assert args.num_generations == 1 and args.per_device_train_batch_size * 8 == 128
    assert (args.learning_rate, args.num_train_epochs, args.max_completion_length) == (1e-6, 5, 4096)
    assert script_args.dataset_name == "data/geometry3k_cues.parquet"


def test_vgs_grpo_recipe_parses_to_the_papers_mix():
    example = load_example()
    script_args, args, _ = example.parse_args(
        [
            "--config",
            str(REPO / "examples/recipes/qwen3_vl_2b_vgs_grpo_geometry3k.yaml"),
            "--bf16",
            "false",
            "--use_cpu",
        ]
    )
    assert script_args.reward_funcs == ["accuracy"] and args.method == ["vgs"] and args.vgs
    assert (args.distillation_weight, args.loss_type, args.scale_rewards) == (0.3, "dapo", "group")
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 512  # the paper's global batch
    assert (args.learning_rate, args.weight_decay, args.lr_scheduler_type) == (1e-6, 0.01, "constant")
    assert (args.temperature, args.top_p, args.max_completion_length) == (1.0, 1.0, 2048)


def test_write_cues_script_writes_a_column_train_vaopd_reads(tmp_path):
    # The cue writer on a local Geometry3K-style file with a tiny model, then a ViCuR step on what it wrote
    import importlib.util

    from datasets import Dataset

    from trl_vaopd.tiny_models import save_tiny_vlm

    model = save_tiny_vlm(tmp_path / "writer", size="teacher", seed=1)
    data = tmp_path / "geometry3k_train.parquet"
    rows = [
        {"images": [noise_image(i)], "problem": f"<image>Find x in figure {i}.", "answer": str(i)} for i in range(8)
    ]
    Dataset.from_list(rows).to_parquet(str(data))
    spec = importlib.util.spec_from_file_location("write_cues", REPO / "examples" / "write_cues.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "with_cues.parquet"
    script.main(
        script.parse_args(
            ["--dataset_name", str(data), "--cue_model", model, "--output", str(output), "--max_new_tokens", "4"]
        )
    )
    assert (tmp_path / "with_cues.parquet.progress.jsonl").is_file()
    example = load_example()
    student = save_tiny_vlm(tmp_path / "student", size="student", seed=0)
    argv = ["--config", str(TINY_RECIPE), "--tiny", "false", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    argv += ["--model_name_or_path", student, "--teacher_model_name_or_path", model, "--dataset_name", str(output)]
    trainer = example.main(*example.parse_args([*argv, "--method", "vicur"]))
    assert len(trainer.train_dataset["cue"]) == 8 and all(trainer.train_dataset["cue"])
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    from trl_vaopd.cue_recovery import has_cue_recovery, load_with_cue_recovery

    assert has_cue_recovery(load_with_cue_recovery(tmp_path / "out"))  # saved with the student


def test_example_loads_models_and_dataset_by_path(tmp_path):
    # The non-tiny path: student, teacher and processor by path, a local Geometry3K-style file, the model saved
    from datasets import Dataset

    from trl_vaopd.tiny_models import save_tiny_vlm

    student = save_tiny_vlm(tmp_path / "student", size="student", seed=0)
    teacher = save_tiny_vlm(tmp_path / "teacher", size="teacher", seed=1)
    data = tmp_path / "geometry3k_train.parquet"
    rows = [
        {"images": [noise_image(i)], "problem": f"<image>Find x in figure {i}.", "answer": str(i)} for i in range(8)
    ]
    Dataset.from_list(rows).to_parquet(str(data))
    example = load_example()
    argv = ["--config", str(TINY_RECIPE), "--tiny", "false", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    argv += ["--model_name_or_path", student, "--teacher_model_name_or_path", teacher, "--dataset_name", str(data)]
    trainer = example.main(*example.parse_args(argv))
    assert trainer.train_dataset.num_rows == 8 and "answer" in trainer.train_dataset.column_names
    assert trainer.processing_class.tokenizer.padding_side == "left"
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    for name in ("config.json", "model.safetensors", "processor_config.json"):
        assert (tmp_path / "out" / name).is_file(), name


# ---------------------------------------------------------------------------------------------------------- QLoRA
def test_qlora_flags_quantize_the_student_only_and_train_the_adapter(tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    from trl import get_peft_config, get_quantization_config

    example = load_example()
    argv = ["--config", str(TINY_RECIPE), "--output_dir", str(tmp_path), "--max_steps", "1"]
    argv += ["--load_in_4bit", "--use_peft", "--lora_r", "4", "--lora_alpha", "8"]
    script_args, training_args, model_args = example.parse_args(argv)
    # The configuration path: ModelConfig flags -> BitsAndBytesConfig (4-bit NF4) and a LoRA config
    quantization = get_quantization_config(model_args)
    assert isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit
    assert quantization.bnb_4bit_quant_type == "nf4"
    assert isinstance(get_peft_config(model_args), LoraConfig)

    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the `qlora` extra)")
    if not torch.cuda.is_available():
        # bitsandbytes runs 4-bit layers on CPU only in its recent multi-backend releases: try it on the tiny student
        student_path, _ = example.tiny_model_paths(script_args, training_args)
        try:
            probe = AutoModelForImageTextToText.from_pretrained(student_path, quantization_config=quantization)
            probe(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().item()
        except Exception as error:  # noqa: BLE001 - the reason is reported verbatim
            pytest.skip(
                f"no GPU, and bitsandbytes {bnb.__version__} cannot run 4-bit layers on this CPU: "
                f"{type(error).__name__}: {error}"
            )
    trainer = example.main(script_args, training_args, model_args)
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in teacher.modules())  # the teacher stays unquantized
    trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert any(p.abs().sum() > 0 for n, p in trainable if "lora_B" in n)  # B starts at zero: the adapter moved
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


# ---------------------------------------------------------------------------------------------------------- vLLM
def tiny_trainer(tmp_path, **overrides):
    from conftest import image_question_dataset, make_args

    from trl_vaopd import VAOPDTrainer

    processor = build_processor("qwen3_vl", build_tokenizer())
    return VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student", seed=0),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(tmp_path, **overrides),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
    )


def test_two_view_scoring_is_independent_of_the_rollout_generator(tmp_path):
    # Any generator (transformers, vLLM colocate or server) hands back completion token ids; the two teacher views
    # score whatever it returns. Here a stand-in returns fixed completions of varied lengths, ending with EOS or not.
    trainer = tiny_trainer(tmp_path)
    tokenizer = trainer.processing_class.tokenizer
    words = tokenizer.encode("The number shown in the picture is seven.")
    canned = [words[: 1 + i % 5] + ([tokenizer.eos_token_id] if i % 2 else []) for i in range(8)]

    def generate(prompt_ids, images, multimodal_fields, has_tool_images=False):
        assert len(prompt_ids) == len(canned)
        return [list(c) for c in canned]

    trainer._generate_single_turn = generate
    trainer.train()
    (batch,) = trainer._buffered_inputs
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    assert sorted(tuple(c[m.bool()].tolist()) for c, m in zip(ids, mask, strict=True)) == sorted(map(tuple, canned))
    logs = trainer.state.log_history[0]
    assert logs["va/mean"] > 0 and torch.isfinite(torch.tensor(logs["loss"]))
    assert batch["vaopd_coefficients"].sum().item() == pytest.approx(2.0, rel=1e-5)  # 2 prompts, each summing to 1
