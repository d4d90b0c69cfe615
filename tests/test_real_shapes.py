"""Every method at Qwen3-VL-2B's and -8B's real widths and vocabularies, on CPU.

The student has Qwen3-VL-2B's widths, heads, head_dim, vision tower widths, patch and merge sizes and its
151,936-row vocabulary; the teacher Qwen3-VL-8B's, with 152,064 rows (heads of different sizes over one tokenizer, as
Qwen2.5-VL-3B and -7B pad theirs). Both have 2 decoder layers and a 2-block vision tower with DeepStack on (the
tower's first block adds its features after decoder layer 0), and images of 256 and 320 pixels become 64 and 100
visual tokens. The teacher's input embedding is tied to its head, which saves 2.3 GiB of float32 that nothing here
reads.

The models are built once per module (about 30 s) and every step trains a copy of the student: one real width pair
is in memory at a time: 4.3 GiB of teacher, twice 1.9 GiB of student and 1.9 GiB of gradients, about 10 GiB.
"""

import copy
import gc
import weakref
from dataclasses import replace

import pytest
import torch
from conftest import make_args, noise_image, question
from datasets import Dataset
from steps import Passes, cat, count_passes
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trl_vaopd import VAOPDTrainer, chunked
from trl_vaopd.chunked import OutputHead, per_token_divergence, token_logprobs, vgs_divergences
from trl_vaopd.model_shapes import REAL_SHAPES, build_qwen3_vl, merged_tokens
from trl_vaopd.tiny_models import build_processor


pytestmark = pytest.mark.slow

STUDENT = REAL_SHAPES["student"].shallow()
TEACHER = replace(REAL_SHAPES["teacher"].shallow(), vocab=152064, tie_embeddings=True)
SIDES = (256, 320)  # one prompt per image side: 64 and 100 merged visual tokens
K = 2


@pytest.fixture(scope="module")
def processor(tokenizer):
    # Images from 256 pixels (64 tokens) up to 512 (256 tokens) keep their size
    return build_processor("qwen3_vl", tokenizer, image_size=256)


@pytest.fixture(scope="module")
def models(tokenizer):
    """The pristine student and the teacher; freed when the module's tests are done."""
    pair = {
        "student": build_qwen3_vl(STUDENT, tokenizer, seed=0),
        "teacher": build_qwen3_vl(TEACHER, tokenizer, seed=1),
    }
    yield pair
    pair.clear()
    gc.collect()


def dataset(cues: bool = False) -> Dataset:
    rows = [
        {"prompt": [{"role": "user", "content": question(i)}], "images": [noise_image(i, side)]}
        for i, side in enumerate(SIDES)
    ]
    if cues:
        for i, row in enumerate(rows):
            row["cue"] = f"the picture shows the number {i}"
    return Dataset.from_list(rows)


def train_one_step(models, processor, tmp_path, method, peft_config=None, **overrides):
    """One real `train()` step of a copy of the student; the passes both backbones ran outside generation."""
    student = copy.deepcopy(models["student"])
    teacher = models["teacher"]
    teacher_passes, student_passes = Passes(teacher), Passes(student)
    settings = dict(per_device_train_batch_size=K * len(SIDES), num_generations=K, max_completion_length=3)
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, method=method, **{**settings, **overrides}),
        train_dataset=dataset(cues="vicur" in method),
        processing_class=processor,
        peft_config=peft_config,
    )
    count_passes(trainer, teacher_passes, student_passes)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if peft_config and p.requires_grad}
    trainer.train()
    return trainer, trainable, teacher_passes, student_passes


# Teacher and student (training) passes per rollout, as the README's method table states them
PASSES = {"opd": (1, 1), "va_opd": (2, 1), "vgs": (2, 2), "vicur": (1, 1)}


def expected_passes(method) -> tuple[int, int]:
    names = [method] if isinstance(method, str) else method
    return max(PASSES[n][0] for n in names), max(PASSES[n][1] for n in names)


def check_step(trainer, method, teacher_passes, student_passes, tokenizer):
    rollouts = K * len(SIDES)
    assert trainer._vocab_size == len(tokenizer)  # 151,936 and 152,064 rows, compared over the tokenizer's tokens
    assert int(cat(trainer._buffered_inputs, "completion_ids").max()) < len(tokenizer)  # no padding row sampled
    prompts = cat(trainer._buffered_inputs, "prompt_ids")
    image_tokens = (prompts == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum(dim=1)
    assert sorted(set(image_tokens.tolist())) == [merged_tokens(side) for side in SIDES]
    loss = trainer.state.log_history[0]["loss"]
    assert loss == loss and abs(loss) < float("inf")
    assert (teacher_passes.rollouts, student_passes.rollouts) == tuple(rollouts * n for n in expected_passes(method))
    # Prefix sharing: each sibling group's prompt ran once per pass
    assert teacher_passes.prompts == len(SIDES) * expected_passes(method)[0]


METHODS = ["opd", "va_opd", "vgs", ["va_opd", "vgs"], "vicur", ["va_opd", "vicur"]]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m if isinstance(m, str) else "+".join(m))
def test_every_method_trains_the_full_student_at_real_widths(models, processor, tokenizer, tmp_path, method):
    trainer, _, teacher_passes, student_passes = train_one_step(models, processor, tmp_path, method)
    check_step(trainer, method, teacher_passes, student_passes, tokenizer)
    pristine = dict(models["student"].named_parameters())
    moved = {n for n, p in trainer.model.named_parameters() if n in pristine and not torch.equal(p, pristine[n])}
    for part in ("visual.blocks.0.", "visual.deepstack_merger_list.0.", "language_model.layers.1.mlp."):
        assert any(part in n for n in moved), part  # the gradient reaches the tower, DeepStack and every layer
    embedding = trainer.model.get_input_embeddings().weight  # tied to the head
    assert torch.equal(
        embedding[len(tokenizer) :], pristine["model.language_model.embed_tokens.weight"][len(tokenizer) :]
    )
    if "vicur" in method:  # the cue-recovery module trains: its output map leaves zero
        assert trainer.model.get_parameter("model.language_model.sink_cross_attns.0.o_proj.weight").any()
    del trainer
    gc.collect()


@pytest.mark.parametrize("method", ["va_opd", ["va_opd", "vgs"], "vicur"], ids=["va_opd", "va_opd+vgs", "vicur"])
def test_lora_students_train_only_their_adapters_at_real_widths(models, processor, tokenizer, tmp_path, method):
    from peft import LoraConfig

    # `qkv`: the vision tower's fused projection
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "qkv"], init_lora_weights=False)
    trainer, before, teacher_passes, student_passes = train_one_step(models, processor, tmp_path, method, lora)
    check_step(trainer, method, teacher_passes, student_passes, tokenizer)
    assert before and all("lora_" in n or ".sink_" in n for n in before)  # nothing else trains
    after = dict(trainer.model.named_parameters())
    moved = {n for n, p in before.items() if not torch.equal(after[n], p)}
    assert any("visual" in n and "lora_" in n for n in moved) and any("language_model" in n for n in moved)
    if method == "vicur":
        assert any(".sink_cross_attns." in n and ".o_proj." in n for n in moved)  # under `modules_to_save`
    del trainer
    gc.collect()


def test_prefix_shared_steps_equal_full_passes_at_real_widths(models, processor, tmp_path):
    """VA-OPD with and without prefix sharing on the same rollouts: the same loss, scores and update."""
    runs = []
    for sharing in (True, False):
        trainer, _, teacher_passes, _ = train_one_step(
            models, processor, tmp_path / str(sharing), "va_opd", prefix_sharing=sharing
        )
        assert teacher_passes.prompts == (2 * len(SIDES) if sharing else 0)
        pristine = dict(models["student"].named_parameters())
        # The update of every parameter but the embedding (its rows of the tokenizer's tokens are kept)
        delta = {
            n: (p[: len(processor.tokenizer)] if "embed_tokens" in n else p).detach()
            - (pristine[n][: len(processor.tokenizer)] if "embed_tokens" in n else pristine[n])
            for n, p in trainer.model.named_parameters()
        }
        micro = trainer._buffered_inputs
        runs.append(
            {
                "loss": trainer.state.log_history[0]["loss"],
                "completions": cat(micro, "completion_ids"),
                "coefficients": cat(micro, "vaopd_coefficients"),
                "delta": delta,
            }
        )
        del trainer, micro
        gc.collect()
    shared, full = runs
    assert torch.equal(shared["completions"], full["completions"])  # the same rollouts
    assert shared["loss"] == pytest.approx(full["loss"], rel=1e-4)
    torch.testing.assert_close(shared["coefficients"], full["coefficients"], rtol=1e-3, atol=1e-5)
    for name, delta in full["delta"].items():
        # A gradient sums many products: its rounding error scales with its largest entries
        scale = max(delta.abs().max().item(), 1e-12)
        torch.testing.assert_close(shared["delta"][name], delta, atol=2e-3 * scale, rtol=1e-3, msg=name)


# ------------------------------------------------------------------------------------------- kernel memory
class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by the tensors that ops allocate (views and in-place results are not new storage),
    and the size of every allocation. A tensor's bytes count until it is freed: saved for the backward, it stays."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: set[int] = set()  # of every allocation
        self._storages: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in self._storages or nbytes == 0:
                continue
            self._storages.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.sizes.add(nbytes)
            weakref.finalize(tensor, self._free, key, nbytes)
        return out


# Small tiles, so that a real vocabulary spans many of them: 4 tokens x 8192 vocabulary entries (TRL's kernels),
# 4 full-vocabulary rows per chunk (VGS's kernel)
TOKEN_CHUNK, VOCAB_CHUNK, VGS_ROWS = 4, 8192, 4


@pytest.fixture
def small_tiles(monkeypatch):
    import trl.kernels.chunked_divergence as divergence_kernel
    import trl.kernels.chunked_logprob as logprob_kernel

    monkeypatch.setattr(divergence_kernel, "TOKEN_CHUNK_SIZE", TOKEN_CHUNK)
    monkeypatch.setattr(divergence_kernel, "VOCAB_CHUNK_SIZE", VOCAB_CHUNK)
    monkeypatch.setattr(logprob_kernel, "TOKEN_CHUNK_SIZE", TOKEN_CHUNK)
    monkeypatch.setattr(chunked, "VOCAB_CHUNK_SIZE", VOCAB_CHUNK)
    monkeypatch.setattr(chunked, "VGS_TILE_ELEMENTS", VGS_ROWS * STUDENT.vocab)


def trainable_head(model) -> torch.Tensor:
    """The model's head weight as a fresh leaf: its gradient stays out of the module's model."""
    return model.get_output_embeddings().weight.detach().requires_grad_()


def test_the_live_bytes_tracker_sees_full_logits(models):
    head = trainable_head(models["student"])
    hidden = torch.randn(16, STUDENT.hidden, requires_grad=True)
    with LiveBytes() as tracked:
        torch.log_softmax(hidden @ head.t(), dim=-1).sum().backward()
    full = 16 * STUDENT.vocab * 4
    assert max(tracked.sizes) >= full and tracked.peak >= 2 * full  # logits and log-probs, both saved


def test_chunked_kernels_never_hold_tokens_x_vocabulary(models, small_tiles):
    """The divergence, the teacher's log-probabilities and VGS's four distributions at the real vocabularies: what
    they allocate is bounded by their tiles (and the head's gradient), far below one model's `(tokens, vocabulary)`
    logits."""
    student_head = OutputHead(trainable_head(models["student"]), None)
    # The teacher's 152,064 rows compared over the student's 151,936 leading ones, as heads of different sizes are
    teacher_head = OutputHead.of(models["teacher"], vocab_size=STUDENT.vocab)
    head_grad = student_head.weight.numel() * 4  # a parameter's gradient: param-sized, not activation memory
    generator = torch.Generator().manual_seed(0)

    def hidden_states(n):
        mask = torch.ones(2, n // 2, dtype=torch.bool)
        hidden_s = torch.randn(2, n // 2, STUDENT.hidden, generator=generator).requires_grad_()
        return mask, hidden_s, torch.randn(2, n // 2, TEACHER.hidden, generator=generator)

    n = 16
    mask, hidden_s, hidden_t = hidden_states(n)
    full_logits, inputs, tile = (
        n * STUDENT.vocab * 4,
        n * (STUDENT.hidden + TEACHER.hidden) * 4,
        TOKEN_CHUNK * VOCAB_CHUNK * 4,
    )
    with LiveBytes() as tracked:
        divergence, _ = per_token_divergence(hidden_s, hidden_t, student_head, teacher_head, mask)
        divergence.sum().backward()
    # Two tiles (student and teacher), the torch fallback's temporaries of a tile's size, the hidden states' copies
    # and gradient (measured: about 5 x `inputs` beside the head's gradient)
    assert tracked.peak - head_grad <= 8 * tile + 6 * inputs < full_logits / 2, (tracked.peak, tile)
    assert max(tracked.sizes - {head_grad}) <= max(tile, inputs)

    with LiveBytes() as tracked, torch.no_grad():
        token_logprobs(hidden_t, teacher_head, torch.randint(0, 500, mask.shape), mask)
    assert tracked.peak <= 8 * tile + 6 * inputs < full_logits / 2, (tracked.peak, tile)

    n = 24  # VGS's kernel reads both heads once per chunk: few chunks keep it quick
    mask, hidden_s, hidden_t = hidden_states(n)
    rows, full_logits = VGS_ROWS * STUDENT.vocab * 4, n * STUDENT.vocab * 4
    with LiveBytes() as tracked:
        hidden_cf = torch.randn(hidden_s.shape, generator=generator).requires_grad_()
        terms = vgs_divergences(hidden_s, hidden_cf, hidden_t, hidden_t + 1, student_head, teacher_head, mask)
        sum(t.sum() for t in terms[:3]).backward()
    # Per chunk: the four distributions' logits and log-probs, `q*`, the gradient's products, each `VGS_ROWS` rows
    assert max(tracked.sizes - {head_grad}) <= rows
    # (measured: 12.5 x `rows`), where four distributions of every token would be 4 x `full_logits`
    assert tracked.peak - head_grad <= 16 * rows < 4 * full_logits, (tracked.peak, rows)
