"""Bad input is refused with a message naming the setting and the fix, before any training compute."""

import pytest
from conftest import image_question_dataset, noise_image
from datasets import Dataset, IterableDataset

from trl_vaopd import VAOPDConfig, VAOPDTrainer
from trl_vaopd.tiny_models import build_model, build_processor, build_tokenizer


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("va_high_fraction", 0.0, "va_high_fraction must be in"),
        ("va_high_fraction", 1.2, "va_high_fraction must be in"),
        ("va_high_weight", 1.5, "va_high_weight must be in"),
        ("pixelate_ratio", 0.0, "pixelate_ratio must be in"),
        ("divergence_temperature", 0.0, "divergence_temperature must be > 0"),
        ("temperature", -1.0, "temperature must be > 0"),
        ("va_weight_temperature", 0.0, "va_weight_temperature must be > 0"),
        ("va_eps", 0.0, "va_eps must be > 0"),
        ("num_generations", 0, "num_generations must be >= 1"),
        ("teacher_batch_size", 0, r"teacher_batch_size must be >= 1 \(None: a micro-batch\), got 0"),
        ("counterfactual_view", "pixellate", "counterfactual_view must be one of pixelate, blur, blank, drop"),
        ("beta", 2.0, "beta must be in"),
        ("vgs_gamma", -0.5, "vgs_gamma must be >= 0"),
        ("vgs_lambda", -0.01, "vgs_lambda must be >= 0"),
        ("vgs_eta", 0.0, "vgs_eta must be > 0"),
        ("vgs_lp_quantile", 1.0, "vgs_lp_quantile must be in"),
        ("vgs_lp_quantile", 0.0, "vgs_lp_quantile must be in"),
        ("vgs_adaptive_gamma_quantiles", [0.7, 0.4], "vgs_adaptive_gamma_quantiles must be two quantiles"),
        ("va_token_mask_fraction", 1.0, "va_token_mask_fraction must be in"),
        ("method", "vaopd", "method must be one or more of opd, va_opd, vgs"),
        ("method", ["opd", "vgs"], "'opd' is the baseline"),
        ("method", ["vgs", "vgs"], "lists a method twice"),
        ("method", [], "method must be one or more of"),
        ("va_token_mask", "middle", "va_token_mask must be one of top, low, random"),
        (
            "visual_advantage",
            "view_kl",
            r"visual_advantage must be one of sampled_token, teacher_view_kl, got 'view_kl'\. Did you mean "
            "'teacher_view_kl'",
        ),
    ],
)
def test_config_rejects_out_of_range_settings(tmp_path, setting, value, message):
    with pytest.raises(ValueError, match=message):
        VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, **{setting: value})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "vgs", "beta": 0.5}, "VGS's terms are reverse KLs"),
        ({"method": ["va_opd", "vgs"], "beta": 0.0}, "VGS's terms are reverse KLs"),
        ({"va_token_mask": "top"}, "set token_grouping=False"),
        (
            {"method": "opd", "visual_advantage": "teacher_view_kl"},
            r"visual_advantage='teacher_view_kl' changes the visual advantage, but no component of method=\['opd'\] "
            r"uses it .* \(e\.g\. method='va_opd'\), or drop the setting",
        ),
    ],
)
def test_config_refuses_settings_a_method_cannot_honour(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, **settings)


@pytest.mark.parametrize(
    "method, overrides, switches",
    [
        ("opd", {}, (False, False, False)),
        ("va_opd", {}, (True, True, False)),
        ("vgs", {}, (False, False, True)),
        (["va_opd", "vgs"], {}, (True, True, True)),
        ("va_opd", {"token_grouping": False}, (True, False, False)),
        ("opd", {"rollout_weighting": True}, (True, False, False)),
        (["vgs", "va_opd"], {"vgs": False}, (True, True, False)),
    ],
)
def test_method_presets_the_component_switches_which_stay_overridable(tmp_path, method, overrides, switches):
    args = VAOPDConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, method=method, **overrides
    )
    assert (args.rollout_weighting, args.token_grouping, args.vgs) == switches
    assert args.method == ([method] if isinstance(method, str) else method)


def test_config_rejects_generation_batch_that_splits_sibling_groups(tmp_path):
    with pytest.raises(
        ValueError, match=r"per_device_train_batch_size=2 x 1 processes x gradient_accumulation_steps=1"
    ):
        VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, num_generations=4)


def test_config_refuses_vllm_where_it_cannot_run(tmp_path):
    # vLLM is not installed here, and this machine has no GPU: either way the config names the setting
    with pytest.raises((ImportError, ValueError), match="use_vllm=True needs"):
        VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, use_vllm=True)


def test_config_defaults_follow_the_paper(tmp_path):
    args = VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4)
    assert (args.num_generations, args.temperature, args.top_p, args.beta) == (4, 0.7, 0.95, 1.0)
    assert args.divergence_temperature == 1.0
    assert (args.counterfactual_view, args.pixelate_ratio) == ("pixelate", 0.1)
    assert (args.va_high_fraction, args.va_high_weight, args.va_weight_temperature, args.va_eps) == (
        0.2,
        0.5,
        1.0,
        1e-6,
    )
    assert args.method == ["va_opd"] and args.rollout_weighting and args.token_grouping and not args.vgs
    assert (args.vgs_gamma, args.vgs_lambda, args.vgs_eta, args.vgs_lp_quantile) == (2.0, 0.01, 0.41, 0.7)
    assert not args.vgs_adaptive_gamma and args.vgs_adaptive_gamma_quantiles == [0.4, 0.7]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    processor = build_processor("qwen3_vl", tokenizer)
    return processor, build_model("qwen3_vl", processor, "student"), build_model("qwen3_vl", processor, "teacher")


def _trainer(tiny, tmp_path, dataset=None, **kwargs):
    processor, student, teacher = tiny
    args = kwargs.pop("args", None) or VAOPDConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, report_to=[], bf16=False
    )
    return VAOPDTrainer(
        model=student,
        teacher_model=kwargs.pop("teacher_model", teacher),
        args=args,
        train_dataset=image_question_dataset(4) if dataset is None else dataset,
        processing_class=kwargs.pop("processing_class", processor),
        **kwargs,
    )


def test_dataset_without_images_is_refused(tiny, tmp_path):
    text_only = Dataset.from_list([{"prompt": [{"role": "user", "content": "2 + 2?"}]}] * 4)
    with pytest.raises(ValueError, match="neither an 'images' nor an 'image' column"):
        _trainer(tiny, tmp_path, text_only)


def test_rows_without_images_are_refused(tiny, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "q"}], "images": [noise_image(i)] if i else []} for i in range(4)]
    with pytest.raises(ValueError, match="1 row\\(s\\) have no image"):
        _trainer(tiny, tmp_path, Dataset.from_list(rows))


def test_video_inputs_are_refused(tiny, tmp_path):
    with_video = image_question_dataset(4).add_column("videos", [["clip.mp4"]] * 4)
    with pytest.raises(ValueError, match="supports image inputs only"):
        _trainer(tiny, tmp_path, with_video)


def test_iterable_dataset_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="map-style `train_dataset`"):
        _trainer(tiny, tmp_path, image_question_dataset(4).to_iterable_dataset())
    assert IterableDataset  # the refused type


def test_missing_teacher_and_tools_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs a `teacher_model`"):
        _trainer(tiny, tmp_path, teacher_model=None)

    def lookup(x: int) -> int:
        """Look up a value.

        Args:
            x: the key.
        """
        return x

    with pytest.raises(ValueError, match="does not support `tools`"):
        _trainer(tiny, tmp_path, tools=[lookup])


def test_a_teacher_with_another_tokenizer_is_refused_naming_both_sizes(tiny, tmp_path):
    from trl_vaopd.tiny_models import save_tiny_vlm

    other = build_tokenizer(vocab_size=600)
    path = save_tiny_vlm(tmp_path / "teacher", size="teacher", tokenizer=other)
    sizes = f"teacher's tokenizer \\({len(other)} tokens\\) differs from the student's \\({len(tiny[0].tokenizer)} tokens\\)"
    with pytest.raises(ValueError, match=sizes):
        _trainer(tiny, tmp_path, teacher_model=path)


def test_a_teacher_head_smaller_than_the_tokenizer_is_refused(tiny, tmp_path):
    teacher = build_model("qwen3_vl", tiny[0], "teacher")
    teacher.resize_token_embeddings(len(tiny[0].tokenizer) - 3)
    with pytest.raises(ValueError, match="teacher's output head has .* rows but the tokenizer has"):
        _trainer(tiny, tmp_path, teacher_model=teacher)


def test_text_only_processing_class_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs a multimodal processor"):
        _trainer(tiny, tmp_path, processing_class=tiny[0].tokenizer)


def test_plain_distillation_config_is_refused(tiny, tmp_path):
    from trl import DistillationConfig

    with pytest.raises(TypeError, match="needs a VAOPDConfig"):
        _trainer(tiny, tmp_path, args=DistillationConfig(output_dir=str(tmp_path), use_cpu=True))


def test_eval_batch_that_splits_sibling_groups_is_refused(tiny, tmp_path):
    args = VAOPDConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, per_device_eval_batch_size=2, bf16=False
    )
    with pytest.raises(ValueError, match="per_device_eval_batch_size=2"):
        _trainer(tiny, tmp_path, args=args, eval_dataset=image_question_dataset(4))
