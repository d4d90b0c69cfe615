"""The demo's text-prior option (teacher and student that also learn to answer without the figure) and the regime
measurement at the start of distillation (`trl_vaopd.demo.regime`), on tiny budgets."""

import json
import math

import pytest
import torch

from trl_vaopd.demo.__main__ import main as demo_main
from trl_vaopd.demo.models import (
    TEXT_PRIOR_RATE,
    DemoSetup,
    ModelSpec,
    TrainSpec,
    _Encoder,
    build_demo_model,
    build_demo_processor,
    cpu_threads,
    prepare_models,
    quick_setup,
    supervised_train,
)
from trl_vaopd.demo.regime import measure_regime
from trl_vaopd.demo.task import DEFAULT_TASK, reference_answer, sample_items


@pytest.fixture(scope="module")
def processor():
    return build_demo_processor()


def test_text_prior_is_off_by_default_and_keys_its_own_cache():
    setup = DemoSetup()
    assert setup.teacher_training.blind_rate == 0.0 and setup.student_training.blind_rate == 0.0
    # The key of the default models the stored replication was made with: the new setting leaves it unchanged
    assert setup.key() == "af82910b78d96a7c"
    prior = setup.with_text_prior()
    assert prior.teacher_training.blind_rate == prior.student_training.blind_rate == TEXT_PRIOR_RATE
    assert len({setup.key(), prior.key(), setup.with_text_prior(0.5).key()}) == 3
    with pytest.raises(ValueError, match="blind_rate"):
        TrainSpec(steps=1, blind_rate=1.5)


def test_figureless_examples_keep_their_answer_as_the_target(processor):
    encoder = _Encoder(processor, DEFAULT_TASK)
    items = sample_items(3, seed=5)
    batch = encoder.supervised(items, ["drop", "pixelate", "original"])
    image_pad = encoder.image_pad_id
    # The dropped prompt holds no image; the other two hold one each, the pixelated one pixelated
    assert [int((row == image_pad).sum()) > 0 for row in batch["input_ids"]] == [False, True, True]
    assert batch["image_grid_thw"].size(0) == 2
    expected = torch.cat(
        [encoder.images([items[1]], "pixelate")["pixel_values"], encoder.images([items[2]])["pixel_values"]]
    )
    assert torch.equal(batch["pixel_values"], expected)
    # Every row's loss covers its own reference answer and end of turn, the dropped one included
    for row, item in enumerate(items):
        answer = processor.tokenizer(reference_answer(item), add_special_tokens=False)["input_ids"]
        labels = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labels == [*answer, encoder.eos_id]


def test_text_prior_training_feeds_figureless_examples(processor):
    model = build_demo_model(processor, ModelSpec(hidden=16, layers=1, vision_depth=1))
    seen = {"rows": 0, "dropped": 0, "images": 0}
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def record(module, args, kwargs):
        if module.training:
            has_image = (kwargs["input_ids"] == image_pad).any(1)
            seen["rows"] += has_image.numel()
            seen["dropped"] += int((~has_image).sum())
            grid = kwargs.get("image_grid_thw")
            seen["images"] += 0 if grid is None else grid.size(0)

    model.register_forward_pre_hook(record, with_kwargs=True)
    spec = TrainSpec(steps=6, batch_size=16, blind_rate=0.5)
    with cpu_threads(1):
        log = supervised_train(model, processor, sample_items(96, seed=3), spec, progress=False)
    assert seen["rows"] == 96 and seen["images"] == seen["rows"] - seen["dropped"]
    # Half the examples without a readable figure, half of those dropped: 24 expected of 96
    assert 12 <= seen["dropped"] <= 36, seen
    assert len(log["losses"]) == 6 and all(math.isfinite(loss) for loss in log["losses"])


@pytest.mark.filterwarnings("ignore:The teacher did not reach")
def test_regime_figures(tmp_path):
    out = tmp_path / "regime.json"
    argv = ["regime", "--quick", "--text_prior", "--items", "4", "--samples", "2", "--no_progress"]
    result = demo_main([*argv, "--cache_dir", str(tmp_path), "--output", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["text_prior"] == TEXT_PRIOR_RATE and result["rollouts"] == 8 and result["tokens"] >= 8
    assert result["models"] == quick_setup().with_text_prior().key()
    assert math.isfinite(result["kl"]) and result["kl"] >= 0.0
    assert 0.0 <= result["kl_share_image_dependent"] <= 1.0
    assert 0.0 <= result["image_dependent_token_share"] <= 1.0
    assert set(result["views"]) == {"drop", "pixelate"}
    for figures in result["views"].values():
        for key in ("kl_counterfactual", "target_shift", "vds"):
            assert math.isfinite(figures[key]) and figures[key] >= 0.0, key
        assert 0.0 <= figures["target_flip"] <= 1.0
    # A student identical to its teacher: every divergence vanishes, and the visual target is the teacher's own
    # prediction (q* = qbar * q / qbar), which pairs each view's student and teacher terms
    with cpu_threads(1):
        models = prepare_models(quick_setup().with_text_prior(), cache_dir=tmp_path, progress=False)
        same = measure_regime(models, num_items=4, samples=2, student=models.teacher())
    assert same["kl"] < 1e-12
    for figures in same["views"].values():
        assert figures["kl_counterfactual"] < 1e-12 and figures["target_shift"] < 1e-12
        assert figures["target_flip"] == 0.0
