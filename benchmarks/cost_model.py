"""A full-depth cost model of VA-OPD, VGS and ViCuR against TRL's OPD, from costs measured at the real widths on CPU.

A model, not a GPU measurement. It measures, at Qwen3-VL-2B's and -8B's real widths (float32, one CPU thread):

- one decoder layer, forward and forward + backward, at a few sequence lengths, fitted as `a L + b L^2` per sequence
  (the `L^2` term is the attention's, measured on its own at longer lengths);
- the vision tower, per block and per image, forward (teacher) and forward + backward (student);
- the output heads at the real vocabulary (151,936 rows), per completion token: the divergence kernel (both heads,
  forward + backward), the teacher's log-probabilities (VA-OPD's two views), VGS's four-distribution kernel;
- ViCuR's cue-recovery module (one layer, forward + backward, over the image's tokens);
- the work that does not grow with the width, at a tiny width: a backbone call's fixed cost (masks, multimodal RoPE
  indices, launches), what a prefix-shared pass does besides its two calls (grouping, the completions' positions, the
  cache's repeat per sibling), and the pixelate view of one rollout's prompt (the view, then the processor);

and composes them into a training step per method at full depth (36-layer teacher, 28-layer student) by the passes
the README's method table states: teacher passes per rollout OPD 1, VA-OPD 2, VGS 2 (and 2 student passes with
gradient), ViCuR 1 (prompt lengthened by the cue) plus the module. TRL's OPD runs every pass over `P + C` positions;
`VAOPDTrainer` with prefix sharing runs each sibling group's prompt once, `P / K + C` positions per rollout, its
attention `P^2 / K + (P + C)^2 - P^2`, in two backbone calls per micro-batch and view where TRL's makes one. Generation is the same work in every method; the ratios are given without it
and with it counted as compute (on a GPU, decoding is memory-bound and slower than that, so ratios move towards 1).

The memory model is arithmetic on the shapes (bf16 weights, gradients and AdamW moments; activations from the saved
tensors of one decoder layer, measured per token), with gradient checkpointing (the student then runs unshared).

`--check` also measures the tiny shapes of `bench_vaopd.py` and compares the model's ratios with the ratios measured
there (`results/results.json`).

    python benchmarks/cost_model.py                 # measure, print the table, write results/cost_model.json
    python benchmarks/cost_model.py --check         # and the agreement with the measured tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_check import Budget, noise_image, prefix_rows  # noqa: E402
from trl.data_utils import prepare_multimodal_messages  # noqa: E402

from trl_vaopd import chunked  # noqa: E402
from trl_vaopd.chunked import OutputHead, per_token_divergence, token_logprobs, vgs_divergences  # noqa: E402
from trl_vaopd.cue_recovery import CueRecoveryAttention  # noqa: E402
from trl_vaopd.evaluation import tokenize_conversations  # noqa: E402
from trl_vaopd.model_shapes import MERGE_SIZE, REAL_SHAPES, ModelShape, build_qwen3_vl, tiny_shape  # noqa: E402
from trl_vaopd.prefix_sharing import backbone_of, prefix_groups, shared_prefix_hidden_states  # noqa: E402
from trl_vaopd.tiny_models import IMAGE_PAD, VISION_END, VISION_START, build_processor, build_tokenizer  # noqa: E402
from trl_vaopd.views import get_view  # noqa: E402


RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("opd", "va_opd", "vgs", "vgs_drop", "va_opd+vgs", "vicur", "va_opd+vicur")
# The modelled parts of a training step (generation apart: the same in every method)
TRAINING = ("teacher", "student", "heads", "module")
# Teacher passes per rollout, student passes with gradient per rollout, second views without the image (drop)
PASSES = {
    "trl_opd": (1, 1, False),
    "opd": (1, 1, False),
    "va_opd": (2, 1, False),
    "vgs": (2, 2, False),
    "vgs_drop": (2, 2, True),
    "va_opd+vgs": (2, 2, False),
    "vicur": (1, 1, False),
    "va_opd+vicur": (2, 1, False),
}


def timed(fn, repeat: int = 3, warmup: bool = True) -> float:
    """Median process CPU seconds of `fn()` (after one warm-up call): one torch thread, so on a machine shared with
    other jobs the CPU time is the work's, where wall time would count the waits."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def fit(lengths, seconds) -> tuple[float, float]:
    """Least squares `t = a L + b L^2`, both non-negative."""
    x = torch.tensor([[float(n), float(n) ** 2] for n in lengths], dtype=torch.float64)
    y = torch.tensor(seconds, dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y).solution.tolist()
    if b < 0:  # attention too small to see at these lengths
        a, b = float((x[:, 0] @ y) / (x[:, 0] @ x[:, 0])), 0.0
    return a, b


# ---------------------------------------------------------------------------------------------------- measurements
def _one_layer(shape: ModelShape, tokenizer, vision_depth: int = 1):
    """`shape`'s widths with one decoder layer, a `vision_depth`-block tower and a small vocabulary: the model the
    backbone measurements below time."""
    return build_qwen3_vl(
        replace(shape, layers=1, vision_depth=vision_depth, deepstack=(), vocab=None), tokenizer, seed=0
    )


def measure_model(
    shape: ModelShape,
    tokenizer,
    lengths,
    rows: int,
    attention_lengths,
    image_side: int,
    repeat: int = 3,
    images: int = 1,
) -> dict:
    """Per-sequence costs of one decoder layer (`a L + b L^2`, `rows` sequences per call), of the vision tower per
    image (`images` per call), and the saved activation bytes of one layer per token, for `shape`'s widths (a 1- and
    a 2-block tower, 1 decoder layer, a small vocabulary)."""
    costs = {}
    towers = {depth: _one_layer(shape, tokenizer, vision_depth=depth) for depth in (1, 2)}
    model = towers[1]
    text = model.model.language_model
    layer, rotary = text.layers[0], text.rotary_emb

    def layer_call(length: int, backward: bool):
        hidden = torch.randn(rows, length, shape.hidden, requires_grad=backward)
        positions = torch.arange(length).expand(3, rows, length)
        embeddings = rotary(hidden, positions)

        def call():
            with torch.set_grad_enabled(backward):
                out = layer(hidden, position_embeddings=embeddings)
                if backward:
                    out.sum().backward()

        return call

    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        seconds = [timed(layer_call(n, backward), repeat) / rows for n in lengths]
        costs[f"layer_{mode}_per_sequence"] = dict(zip(map(str, lengths), seconds, strict=True))
        a, _ = fit(lengths, seconds)
        costs[f"layer_{mode}_a"] = a

    # The attention's L^2 term, measured on its own (causal SDPA with the layer's heads) at longer lengths
    def attention_call(length: int, backward: bool):
        q = torch.randn(1, shape.heads, length, shape.head_dim, requires_grad=backward)
        k = torch.randn(1, shape.heads, length, shape.head_dim, requires_grad=backward)
        v = torch.randn(1, shape.heads, length, shape.head_dim, requires_grad=backward)

        def call():
            with torch.set_grad_enabled(backward):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                if backward:
                    out.sum().backward()

        return call

    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        seconds = [timed(attention_call(n, backward), repeat) for n in attention_lengths]
        costs[f"attention_{mode}_per_sequence"] = dict(zip(map(str, attention_lengths), seconds, strict=True))
        # The quadratic part of the attention core; its linear part is already in the layer's `a`
        costs[f"layer_{mode}_b"] = fit(attention_lengths, seconds)[1]

    # Saved activations of one layer, per token (what a backward keeps without gradient checkpointing)
    saved = {}
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in weights:  # the layer's weights are saved too, but they are not activations
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    hidden = torch.randn(1, lengths[0], shape.hidden, requires_grad=True)
    embeddings = rotary(hidden, torch.arange(lengths[0]).expand(3, 1, lengths[0]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, position_embeddings=embeddings)
    costs["layer_saved_bytes_per_token_fp32"] = sum(saved.values()) / lengths[0]

    # Vision tower per image of `image_side` pixels, `images` per call: a block from the 2- minus the 1-block tower
    grid = image_side // 16
    pixels = torch.randn(images * grid * grid, 3 * 2 * 16 * 16)
    grid_thw = torch.tensor([[1, grid, grid]] * images)
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        tower = {}
        for depth, m in towers.items():
            visual = m.model.visual
            if backward:
                visual.requires_grad_(True)

            def call(visual=visual, backward=backward):
                with torch.set_grad_enabled(backward):
                    out = visual(pixels, grid_thw=grid_thw)
                    if backward:
                        out.pooler_output.sum().backward()

            tower[depth] = timed(call, repeat) / images
        block = max(tower[2] - tower[1], 0.0)
        costs[f"vision_{mode}_block"] = block
        costs[f"vision_{mode}_rest"] = tower[1] - block
    costs["vision_image_side"], costs["vision_patches"] = image_side, grid * grid

    return costs


def measure_call(shape: ModelShape, tokenizer, lengths, rows: int, image_side: int, repeat: int = 3) -> dict:
    """The fixed cost of one backbone call, forward and forward + backward: a 1-layer model's whole forward over
    `rows` rows with an image each, fitted as `c + slope L` over the length, less its vision tower's time. What is
    left is the call's own work (masks, multimodal RoPE indices, launch costs), whatever the call's size."""
    model = _one_layer(shape, tokenizer)
    grid = image_side // 16
    ids = tokenizer.convert_tokens_to_ids
    image_row = [ids(VISION_START)] + [ids(IMAGE_PAD)] * (grid // MERGE_SIZE) ** 2 + [ids(VISION_END)]
    word = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    pixels = torch.randn(rows * grid * grid, 3 * 2 * 16 * 16)
    grid_thw = torch.tensor([[1, grid, grid]] * rows)
    costs = {}
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        model.requires_grad_(backward)

        def tower(backward=backward):
            with torch.set_grad_enabled(backward):
                out = model.model.visual(pixels, grid_thw=grid_thw)
                if backward:
                    out.pooler_output.sum().backward()

        seconds = []
        for n in lengths:
            input_ids = torch.tensor([image_row + [word] * n] * rows)

            def call(input_ids=input_ids, backward=backward):
                with torch.set_grad_enabled(backward):
                    out = model.model(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        pixel_values=pixels,
                        image_grid_thw=grid_thw,
                        mm_token_type_ids=(input_ids == ids(IMAGE_PAD)).long(),
                        use_cache=False,
                    )
                    if backward:
                        out.last_hidden_state.sum().backward()

            seconds.append(timed(call, repeat))
        x = torch.tensor([[1.0, float(n + len(image_row))] for n in lengths], dtype=torch.float64)
        intercept = torch.linalg.lstsq(x, torch.tensor(seconds, dtype=torch.float64)).solution[0].item()
        costs[f"call_{mode}_per_call"] = dict(zip(map(str, lengths), seconds, strict=True))
        costs[f"call_{mode}"] = max(intercept - timed(tower, repeat), 0.0)
    return costs


def measure_sharing(shape: ModelShape, tokenizer, image_side: int, rows: int, k: int, repeat: int = 3) -> float:
    """The work of one prefix-shared pass outside its two backbone calls (grouping, the completions' multimodal
    positions, the cache's repeat per sibling), on a 1-layer model over `rows` rollouts in groups of `k`."""
    model = _one_layer(shape, tokenizer)
    processor = build_processor("qwen3_vl", tokenizer, image_size=image_side)
    batch = prefix_rows(processor, Budget(prompts=rows // k, k=k, length=32, image_size=image_side), "cpu")
    inside, backbone = [], backbone_of(model)

    def shared_pass():
        with torch.no_grad():
            shared_prefix_hidden_states(model, batch, prefix_groups(batch))

    shared_pass()  # the warm-up, outside the backbone's count
    started = backbone.register_forward_pre_hook(lambda *_: inside.append(-time.process_time()))
    ended = backbone.register_forward_hook(lambda *_: inside.append(time.process_time()))
    total = timed(shared_pass, repeat, warmup=False)
    started.remove(), ended.remove()
    return max(total - sum(inside) / repeat, 0.0)


def measure_view(tokenizer, image_side: int, repeat: int = 3) -> float:
    """The pixelate view of one rollout's prompt, as the trainer builds it: the view of its image, then the processor
    over the prompt (CPU work, per rollout, whatever the model)."""
    processor = build_processor("qwen3_vl", tokenizer, image_size=image_side)
    image = noise_image(0, image_side)
    view = get_view("pixelate")
    prompt = [{"role": "user", "content": "Which number is in the picture?"}]
    return timed(
        lambda: tokenize_conversations(processor, [prepare_multimodal_messages(prompt, [view(image)])]), repeat
    )


def measure_heads(student: ModelShape, teacher: ModelShape, vocab: int, tokens: int) -> dict:
    """Per completion token: the divergence kernel (forward + backward), the teacher's log-probabilities (forward),
    VGS's kernel (forward + backward), the student's head forward (generation)."""
    generator = torch.Generator().manual_seed(0)
    w_s = (torch.randn(vocab, student.hidden, generator=generator) * 0.02).requires_grad_()
    w_t = torch.randn(vocab, teacher.hidden, generator=generator) * 0.02
    head_s, head_t = OutputHead(w_s, None), OutputHead(w_t, None)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    h_s = torch.randn(1, tokens, student.hidden, generator=generator).requires_grad_()
    h_t = torch.randn(1, tokens, teacher.hidden, generator=generator)
    ids = torch.randint(0, vocab, (1, tokens), generator=generator)

    def divergence():
        per_token_divergence(h_s, h_t, head_s, head_t, mask)[0].sum().backward()

    def teacher_logprobs():
        with torch.no_grad():
            token_logprobs(h_t, head_t, ids, mask)

    def student_head():
        with torch.no_grad():
            token_logprobs(h_s, head_s, ids, mask)

    def vgs():
        terms = vgs_divergences(h_s, h_s.detach() + 1, h_t, h_t + 1, head_s, head_t, mask)
        sum(t.sum() for t in terms[:3]).backward()

    out = {}
    for name, fn in (("divergence", divergence), ("teacher_logprob", teacher_logprobs), ("vgs", vgs)):
        out[name] = timed(fn, repeat=1, warmup=False) / tokens
        w_s.grad = h_s.grad = None
    out["student_head_fwd"] = timed(student_head, repeat=1, warmup=False) / tokens
    return out


def measure_module(student: ModelShape, image_tokens: int) -> float:
    """One cue-recovery layer, forward + backward, for one row whose image has `image_tokens` tokens."""
    module = CueRecoveryAttention(student.hidden, student.heads)
    torch.nn.init.normal_(module.o_proj.weight, std=0.02)
    query = torch.randn(8, student.hidden, requires_grad=True)
    visual = torch.randn(8, image_tokens, student.hidden, requires_grad=True)
    mask = torch.ones(8, image_tokens, dtype=torch.bool)
    return timed(lambda: module(query, visual, mask).sum().backward()) / 8


# ---------------------------------------------------------------------------------------------------------- model
def pass_cost(costs: dict, layers: int, mode: str, tokens: float, pairs: float) -> float:
    """`layers` decoder layers over `tokens` positions whose attention spans `pairs` (an `L^2`-equivalent)."""
    return layers * (costs[f"layer_{mode}_a"] * tokens + costs[f"layer_{mode}_b"] * pairs)


def positions(prompt: float, completion: float, k: int, shared: bool) -> tuple[float, float]:
    """(positions, attention `L^2`-equivalent) per rollout of one pass."""
    full = prompt + completion
    if not shared:
        return full, full**2
    return prompt / k + completion, prompt**2 / k + full**2 - prompt**2


def vision_cost(costs: dict, depth: int, mode: str) -> float:
    return depth * costs[f"vision_{mode}_block"] + costs[f"vision_{mode}_rest"]


def step(method: str, m: dict, s: dict, shared: bool) -> dict:
    """Modelled seconds per rollout of one step of `method` (teacher, student, heads, module, generation)."""
    teachers, students, drop = PASSES[method]
    st, tt = m["student"], m["teacher"]
    p_text, image, completion, k = s["prompt_text"], s["image_tokens"], s["completion"], s["k"]
    prompt = p_text + image
    cue = s["cue_tokens"] if "vicur" in method else 0
    share = shared and method != "trl_opd"
    images_per_rollout = 1 / k if share else 1.0
    # Teacher: the original view (with the cue for ViCuR), then the counterfactual view(s)
    # The drop view leaves out the image's tokens and its two vision markers
    dropped = image + 2
    teacher = teacher_positions = 0.0
    for view in range(teachers):
        view_prompt = prompt + cue - (dropped if drop and view else 0)
        tokens, pairs = positions(view_prompt, completion, k, share)
        teacher_positions += tokens
        teacher += pass_cost(tt, s["teacher_layers"], "fwd", tokens, pairs)
        if not (drop and view):
            teacher += images_per_rollout * vision_cost(tt, s["teacher_vision_depth"], "fwd") * s["image_scale"]
    student = 0.0
    for view in range(students):
        view_prompt = prompt - (dropped if drop and view else 0)
        tokens, pairs = positions(view_prompt, completion, k, share)
        student += pass_cost(st, s["student_layers"], "fwd_bwd", tokens, pairs)
        if not (drop and view):
            student += images_per_rollout * vision_cost(st, s["student_vision_depth"], "fwd_bwd") * s["image_scale"]
    # Each pass is one backbone call per micro-batch of `rows` rollouts; a shared one two (the prompts, then the
    # completions on their cache)
    calls = (2 if share else 1) / s["rows"]
    teacher += teachers * calls * tt["call_fwd"]
    student += students * calls * st["call_fwd_bwd"]
    # What a shared pass does besides its backbone calls, per micro-batch
    if share:
        glue = m["sharing_per_pass"][str(s["image_side"])] / s["rows"]
        teacher += teachers * glue
        student += students * glue
    # The pixelate view's prompts, one per rollout (the drop view re-tokenizes text only: left out)
    if teachers == 2 and not drop:
        teacher += m["view_per_image"][str(s["image_side"])]
    heads = m["heads"]
    if "vgs" in method:
        head = heads["vgs"] * completion
    else:
        head = heads["divergence"] * completion
    if "va_opd" in method:
        head += 2 * heads["teacher_logprob"] * completion
    module = 0.0
    if "vicur" in method:
        module_layers = len(range(0, s["student_layers"], 5))
        module = module_layers * m["module_per_row"] * images_per_rollout
    # Generation (the same in every method): the student's prefill of P and C decoding steps, its head per token
    tokens, pairs = positions(prompt, completion, k, False)
    generation = pass_cost(st, s["student_layers"], "fwd", tokens, pairs) + heads["student_head_fwd"] * completion
    generation += vision_cost(st, s["student_vision_depth"], "fwd") * s["image_scale"]
    return {
        "teacher": teacher,
        "student": student,
        "heads": head,
        "module": module,
        "generation": generation,
        "teacher_positions": teacher_positions,
    }


def memory(method: str, s: dict, saved_per_token: dict, shared: bool) -> float:
    """Modelled peak bytes of one GPU: bf16 weights, student gradients and AdamW moments, the student's
    checkpointed activations (layer inputs, one layer recomputed) per micro-batch, the kept teacher hidden states of
    the local generation batch, the kernels' tiles, the cue-recovery module's parameters and states."""
    teachers, students, drop = PASSES[method]
    n_s, n_t = s["student_params"], s["teacher_params"]
    total = 2 * n_t + (2 + 2 + 4) * n_s
    prompt = s["prompt_text"] + s["image_tokens"]
    per_rollout = prompt + s["completion"]  # the student runs unshared under gradient checkpointing
    micro = s["micro_batch"]
    activation = 0.0
    for view in range(students):
        tokens = micro * (per_rollout - (s["image_tokens"] if drop and view else 0))
        activation += tokens * s["student_hidden"] * 2 * s["student_layers"]  # checkpointed layer inputs, bf16
    activation += micro * per_rollout * saved_per_token["student"] / 2  # one layer recomputed, bf16
    total += activation
    # Kept teacher hidden states (bf16): the views the loss reads, for the whole local generation batch (TRL's OPD:
    # one micro-batch, transiently)
    kept_views = 0 if method in ("trl_opd",) else (2 if "vgs" in method else 1)
    kept_rows = s["generation_batch"] if kept_views else micro
    total += max(kept_views, 1) * kept_rows * s["completion"] * s["teacher_hidden"] * 2
    # Kernel tiles: two float32 (tokens x 32768) tiles and their temporaries; VGS: four distributions' rows
    tile_tokens = min(micro * s["completion"], 4096)
    total += chunked.VGS_TILE_ELEMENTS * 4 * 12 if "vgs" in method else tile_tokens * 32768 * 4 * 4
    if "vicur" in method:
        total += len(range(0, s["student_layers"], 5)) * 4 * s["student_hidden"] ** 2 * (2 + 2 + 4)
    return total


def scenario(prompt_text: int, image_side: int, completion: int, k: int, measured_side: int) -> dict:
    image_tokens = (image_side // 32) ** 2
    return {
        "prompt_text": prompt_text,
        "image_tokens": image_tokens,
        "image_side": image_side,
        # Vision cost scales with patches (attention in the tower is windowless but small next to its MLPs)
        "image_scale": (image_side / measured_side) ** 2,
        "completion": completion,
        "k": k,
        "cue_tokens": 64,
    }


def full_depth(m: dict) -> dict:
    st, tt = REAL_SHAPES["student"], REAL_SHAPES["teacher"]
    base = {
        "student_layers": st.layers,
        "teacher_layers": tt.layers,
        "student_vision_depth": st.vision_depth,
        "teacher_vision_depth": tt.vision_depth,
        "student_params": m["params"]["student"],
        "teacher_params": m["params"]["teacher"],
        "student_hidden": st.hidden,
        "teacher_hidden": tt.hidden,
        "micro_batch": 4,
        "rows": 4,
        "generation_batch": 16,
    }
    table = []
    for prompt_name, (text, side) in {"geometry3k_like": (64, 448), "large_image": (64, 1024)}.items():
        for completion in (512, 1024, 2048):
            s = {**base, **scenario(text, side, completion, 4, m["image_side"])}
            reference = step("trl_opd", m, s, False)
            ref_train = sum(reference[key] for key in TRAINING)
            ref_all = ref_train + reference["generation"]
            ref_memory = memory("trl_opd", s, m["saved"], False)
            for method in METHODS:
                row = {"prompt": prompt_name, "P": text + s["image_tokens"], "C": completion, "method": method}
                for shared in (True, False):
                    parts = step(method, m, s, shared)
                    train = sum(parts[key] for key in TRAINING)
                    tag = "shared" if shared else "unshared"
                    row[f"step_ratio_{tag}"] = train / ref_train
                    row[f"step_ratio_with_generation_{tag}"] = (train + parts["generation"]) / ref_all
                row["memory_ratio"] = memory(method, s, m["saved"], True) / ref_memory
                table.append(row)
    return {"table": table}


# ------------------------------------------------------------------------------------------------ the tiny check
def agreement(tokenizer) -> dict:
    """The model at the tiny shapes of `bench_vaopd.py` against the ratios it measured (`results/results.json`)."""
    report = json.loads((RESULTS / "results.json").read_text())
    by = {(r["tag"], r["trainer"]): r for r in report["results"]}
    config = by[("base", "trl_opd")]["config"]
    student, teacher = tiny_shape(64, layers=4), tiny_shape(128, layers=4)
    rows = config["per_device_train_batch_size"]
    lengths = (48, 96, 192)
    m = {
        # Batched as the benchmark's passes are: a micro-batch of rows (and of images) per call
        "student": measure_model(student, tokenizer, lengths, rows, lengths, 64, images=rows),
        "teacher": measure_model(teacher, tokenizer, lengths, rows, lengths, 64, images=rows),
        "heads": measure_heads(student, teacher, len(tokenizer), rows * 32),
        "module_per_row": measure_module(student, 4),
        "image_side": 64,
    }
    for name, shape in (("student", student), ("teacher", teacher)):
        m[name].update(measure_call(shape, tokenizer, lengths, rows, 64))
    sides = {max(by[case]["config"]["image_size"], 64) for case in by}  # 64: the tiny processor's smallest side
    m["view_per_image"] = {str(side): measure_view(tokenizer, side) for side in sorted(sides)}
    m["sharing_per_pass"] = {str(side): measure_sharing(student, tokenizer, side, rows, 4) for side in sorted(sides)}
    # The benchmark's cue, in tokens: what it added to the teacher's shared prompt, per rollout, times K
    cue_tokens = config["k"] * (
        by[("base", "vicur")]["teacher_positions_per_rollout"]
        - by[("base", "vaopd_off")]["teacher_positions_per_rollout"]
    )
    names = {
        "vaopd": "va_opd",
        "vgs": "vgs_drop",
        "vaopd_vgs": "va_opd+vgs",
        "vicur": "vicur",
        "vaopd_unshared": "va_opd",
    }
    checks = []
    cases = [("base", t) for t in ("vaopd", "vgs", "vaopd_vgs", "vicur")]
    cases += [
        (tag, t)
        for tag in ("long_prompt_k4", "long_prompt_k8", "geometry3k_like_k4", "geometry3k_like_k8")
        for t in ("vaopd", "vaopd_unshared")
    ]
    for tag, trainer in cases:
        opd, run = by[(tag, "trl_opd")], by[(tag, trainer)]
        c = run["config"]
        side = max(c["image_size"], 64)
        image_tokens = (side // 32) ** 2
        s = {
            "student_layers": 4,
            "teacher_layers": 4,
            "student_vision_depth": 2,
            "teacher_vision_depth": 2,
            **scenario(0, side, c["completion_length"], c["k"], 64),
        }
        s["prompt_text"] = run["prompt_tokens_per_rollout"] - image_tokens
        s["cue_tokens"] = cue_tokens
        s["rows"] = c["per_device_train_batch_size"]
        shared = trainer != "vaopd_unshared"
        ref, got = step("trl_opd", m, s, False), step(names[trainer], m, s, shared)
        # The share of TRL's measured step that the model covers: teacher and student groups and the kernels
        g = opd["group_medians_s"]
        covered = (
            g["teacher"]
            + g["student"]
            + opd["phase_medians_s"].get("objective_forward", 0)
            + opd["phase_medians_s"].get("objective_backward", 0)
        )
        share = covered / opd["median_step_time_s"]
        ratio = sum(got[k] for k in TRAINING) / sum(ref[k] for k in TRAINING)
        predicted = 1 - share + share * ratio
        measured = run["median_step_time_s"] / opd["median_step_time_s"]
        checks.append(
            {
                "tag": tag,
                "trainer": trainer,
                "teacher_ratio_model": got["teacher"] / ref["teacher"],
                "teacher_ratio_measured": run["group_medians_s"]["teacher"] / g["teacher"],
                "student_ratio_model": got["student"] / ref["student"],
                "student_ratio_measured": run["group_medians_s"]["student"] / g["student"],
                "teacher_positions_model": got["teacher_positions"],
                "teacher_positions_measured": run["teacher_positions_per_rollout"],
                "step_ratio_model": predicted,
                "step_ratio_measured": measured,
            }
        )
    return {"measured": m, "checks": checks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="also the agreement with the measured tiny shapes")
    parser.add_argument("--out", default=str(RESULTS / "cost_model.json"))
    parser.add_argument("--reuse", help="a report of this script: model from its measured costs, measure nothing")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    start = time.perf_counter()
    student, teacher = REAL_SHAPES["student"], REAL_SHAPES["teacher"]
    side = 448  # 784 patches, 196 visual tokens
    m = json.loads(Path(opts.reuse).read_text())["measured"] if opts.reuse else None
    m = m or {
        "student": measure_model(student, tokenizer, (64, 128, 256), 1, (256, 512, 1024), side, repeat=1),
        "teacher": measure_model(teacher, tokenizer, (64, 128, 256), 1, (256, 512, 1024), side, repeat=1),
        "heads": measure_heads(student, teacher, student.vocab, 32),
        "module_per_row": measure_module(student, 196),
        "image_side": side,
    }
    if "call_fwd" not in m["student"]:
        # A call's fixed cost does not grow with the width (it is the Python and launch work around the compute), and
        # at the real widths it would vanish in the compute's noise: measured at a tiny width, as the tiny check does
        calls = measure_call(tiny_shape(64, layers=1), tokenizer, (48, 96, 192), 4, 64)
        for name in ("student", "teacher"):
            m[name].update(calls)
    if "view_per_image" not in m:
        # CPU work that does not grow with the models' width: measured at a tiny width
        m["view_per_image"] = {str(side): measure_view(tokenizer, side) for side in (448, 1024)}
        tiny = tiny_shape(64, layers=1)
        m["sharing_per_pass"] = {str(side): measure_sharing(tiny, tokenizer, side, 4, 4) for side in (448, 1024)}
    m["saved"] = {k: m[k]["layer_saved_bytes_per_token_fp32"] for k in ("student", "teacher")}
    # Parameters of the full-depth models, counted on the meta device (nothing allocated)
    m["params"] = {
        k: sum(p.numel() for p in build_qwen3_vl(shape, tokenizer, seed=0, device="meta").parameters())
        for k, shape in REAL_SHAPES.items()
    }
    report = {"measured": m, "full_depth": full_depth(m), "machine": {"torch": torch.__version__, "threads": 1}}
    if opts.check:
        report["agreement"] = agreement(tokenizer)
    report["wall_s"] = time.perf_counter() - start
    Path(opts.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    m = report["measured"]
    lines = ["Measured (CPU, float32, one thread; seconds):", ""]
    lines.append("| | student (2048) | teacher (4096) |")
    lines.append("|---|---|---|")
    for key, label in (
        ("layer_fwd_a", "decoder layer forward, per token (a)"),
        ("layer_fwd_bwd_a", "decoder layer forward + backward, per token (a)"),
        ("layer_fwd_b", "attention forward, per L^2 (b)"),
        ("layer_fwd_bwd_b", "attention forward + backward, per L^2 (b)"),
        ("vision_fwd_block", "vision block forward, per 448 px image"),
        ("vision_fwd_bwd_block", "vision block forward + backward, per 448 px image"),
        ("layer_saved_bytes_per_token_fp32", "saved activations of one layer, bytes per token (fp32)"),
    ):
        lines.append(f"| {label} | {m['student'][key]:.4g} | {m['teacher'][key]:.4g} |")
    h = m["heads"]
    lines.append(
        f"\nHeads at vocabulary 151,936, per completion token: divergence kernel (fwd+bwd) {h['divergence']:.4g} s, "
        f"teacher log-probs {h['teacher_logprob']:.4g} s, VGS kernel (fwd+bwd) {h['vgs']:.4g} s, student head "
        f"forward {h['student_head_fwd']:.4g} s; cue-recovery layer (fwd+bwd, 196 image tokens) "
        f"{m['module_per_row']:.4g} s per row.\n"
    )
    lines.append(
        "| prompt | P | C | method | step ratio, shared | unshared | with generation, shared | unshared | memory ratio |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in report["full_depth"]["table"]:
        lines.append(
            f"| {r['prompt']} | {r['P']} | {r['C']} | {r['method']} | {r['step_ratio_shared']:.3f} | "
            f"{r['step_ratio_unshared']:.3f} | {r['step_ratio_with_generation_shared']:.3f} | "
            f"{r['step_ratio_with_generation_unshared']:.3f} | {r['memory_ratio']:.3f} |"
        )
    if "agreement" in report:
        lines.append(
            "\n| tiny run | trainer | teacher positions / rollout, model / counted | teacher ratio model / measured "
            "| student ratio model / measured | step ratio model / measured |"
        )
        lines.append("|---|---|---|---|---|---|")
        for c in report["agreement"]["checks"]:
            lines.append(
                f"| {c['tag']} | {c['trainer']} | {c['teacher_positions_model']:.2f} / "
                f"{c['teacher_positions_measured']:.2f} | {c['teacher_ratio_model']:.3f} / {c['teacher_ratio_measured']:.3f} | "
                f"{c['student_ratio_model']:.3f} / {c['student_ratio_measured']:.3f} | "
                f"{c['step_ratio_model']:.3f} / {c['step_ratio_measured']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
