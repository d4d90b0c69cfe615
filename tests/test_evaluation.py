"""Tests for answer extraction, matching, the accuracy reward and the avg@k evaluator."""

import copy
import itertools

import pytest
import torch
from datasets import Dataset
from PIL import Image

from trl_vaopd.evaluation import (
    accuracy_reward,
    answers_match,
    avg_at_k,
    extract_answer,
    last_boxed_content,
    make_hf_generate,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # \boxed{} wins over everything else, and the last one wins
        (r"First \boxed{3}, then corrected: \boxed{4}.", "4"),
        (r"So the area is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}} is the ratio", r"\frac{\sqrt{3}}{2}"),
        (r"Nested: \boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
        (r"The answer is 5, i.e. \boxed{7}", "7"),
        (r"\fbox{12}", "12"),
        (r"so $\boxed 5$", "5"),
        (r"Truncated \boxed{\frac{1}{2", "2"),  # unterminated box falls through to the last number
        # "the answer is" / "Answer:"
        ("The answer is 12 cm.", "12 cm"),
        ("Therefore, the final answer is: 3.5 meters. Done.", "3.5 meters"),
        ("the answer is 7\nThe answer is 9", "9"),
        ("Answer: B", "B"),
        ("ANSWER: **42**", "42"),
        ("The answer is (C).", "(C)"),
        # multiple-choice letters
        ("Comparing the options, I choose (C).", "C"),
        ("Option D is correct", "D"),
        ("After checking each one:\nB.", "B"),
        ("B", "B"),
        # last number, with signs, separators, fractions, radicals and units
        ("So x equals -5.", "-5"),
        ("The total is 1,234.5 dollars", "1,234.5"),
        ("half of it: 3/4", "3/4"),
        (r"x = \frac{3}{4}", r"\frac{3}{4}"),
        (r"x = \dfrac{3}{4}", r"\dfrac{3}{4}"),
        (r"The side is 2\sqrt{3} units", r"2\sqrt{3}"),
        ("The angle measures 60 degrees", "60"),
        ("The angle measures 60°", "60"),
        ("The area is 25 units^2", "25"),
        ("The area is 25 m^{2}", "25"),
        ("Between 3 and 10-5", "5"),
        ("It is \u22123", "-3"),  # Unicode minus
        # a lone capital letter at the end of a sentence is a point name, not an option
        ("The line passes through A and B.", None),
        ("no numbers here", None),
        ("", None),
        (r"\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{\boxed{1} + \boxed{2}}", r"\boxed{1} + \boxed{2}"),
        (r"a \boxed{x} b \fbox{y}", "y"),
        ("nothing", None),
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("12 cm", "12"),
        ("12 cm.", "12"),
        (r"$12\text{ cm}^2$", "12"),
        ("12 square units", "12"),
        (r"60^\circ", "60"),
        (r"60^{\circ}", "60"),
        ("60°", "60"),
        (r"50\%", "50"),
        ("1,000,000", "1000000"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\left(\frac{1}{2}\right)", r"(\frac{1}{2})"),
        ("x = 5", "5"),
        (r"m \angle ABC = 60", "60"),
        ("(B)", "b"),
        ("B", "b"),
        ("Yes.", "yes"),
        (r"\boxed{7}", "7"),
        (r"\text{\textbf{Paris}}", "paris"),
        ("  \n", ""),
    ],
)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("12", "12"),
        ("12 cm", "12"),
        ("12", r"12\text{ cm}"),
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\dfrac{1}{2}"),
        ("1/2", r"\frac{1}{2}"),
        (r"2\sqrt{3}", "3.4641016"),
        (r"\frac{\sqrt{3}}{2}", "0.8660254"),
        (r"4\sqrt{3}", r"\sqrt{48}"),
        (r"\sqrt[3]{8}", "2"),
        (r"2\pi", "6.2831853"),
        (r"\frac{\pi}{2}", "1.5707963"),
        ("60", r"60^\circ"),
        ("60 degrees", "60"),
        ("-5", "-5.0"),
        ("1,000", "1000"),
        ("3.0000", "3"),
        ("x = 5", "5"),
        ("B", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("B. 12 cm", "B"),
        ("option C", "C"),
        ("Yes", "yes"),
        (r"2 \cdot 3", "6"),
        (r"\boxed{9}", "9"),
        # The hand-written parser compared closed-form numbers only and refused these; math-verify compares
        # expressions symbolically, and they are the same expression
        ("x + 1", "1 + x"),
        (r"\frac{x}{2}", "0.5x"),
    ],
)
def test_answers_match(prediction, reference):
    assert answers_match(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        (None, "12"),
        ("", "12"),
        ("13", "12"),
        ("3.46", r"2\sqrt{3}"),  # two-decimal rounding is outside the tolerance
        ("-5", "5"),
        ("A", "B"),
        ("Bob", "B"),
        ("a cat", "A"),
        ("12", "B"),
        # math-verify compares decimals rounded to 6 places; the hand-written parser it replaced allowed a relative
        # 1e-4, and so matched these. A reference given to four decimals says 7.0005: 7 is wrong at that precision
        ("7", "7.0005"),
        ("1/0", "1"),
        (r"\sqrt{-1}", "1"),
        ("10^{10^{10}}", "1"),  # refused instead of computing a huge integer
        ("0.5^{-10^{999}}", "1"),
        ("no", "yes"),
    ],
)
def test_answers_do_not_match(prediction, reference):
    assert not answers_match(prediction, reference)


@pytest.mark.parametrize(
    ("text", "last", "first"),
    [
        # a model that corrects itself: the last committed answer, or the first (the VA-OPD reference protocol)
        (r"Answer: 3. Checking again, the area is \boxed{4}", "4", "3"),
        (r"\boxed{3} ... no: \boxed{4}. The answer is 5.", "4", "3"),
        (r"First the answer is 7. Then \boxed{8}", "8", "7"),
        ("The answer is 7. The answer is 9.", "9", "7"),
        # with no committed answer, the choice letters and the numbers follow the policy too
        ("Maybe (A), but (C) fits better", "C", "A"),
        ("3 apples and 5 pears", "5", "3"),
    ],
)
def test_answer_policy(text, last, first):
    assert extract_answer(text) == extract_answer(text, policy="last") == last
    assert extract_answer(text, policy="first") == first


def test_answer_policy_reaches_the_reward_and_avg_at_k():
    completion = r"Answer: 3. Checking again, \boxed{4}"
    assert accuracy_reward([completion], ["4"]) == [1.0]
    assert accuracy_reward([completion], ["4"], policy="first") == [0.0]
    result = avg_at_k(lambda rows: [completion] * len(rows), [{"answer": "3"}], k=2, policy="first")
    assert result["avg@k"] == 1.0
    with pytest.raises(ValueError, match="policy must be one of"):
        extract_answer("3", policy="middle")


def test_matching_works_outside_the_main_thread():
    # math-verify's timeouts use signal.alarm, which only the main thread may: elsewhere they are off, as in TRL
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(answers_match(r"\frac{\sqrt{3}}{2}", "0.8660254")))
    thread.start()
    thread.join()
    assert results == [True]


def test_extract_then_match_without_answer_is_no_match():
    assert extract_answer("I cannot tell from the figure.") is None
    assert not answers_match(extract_answer("I cannot tell from the figure."), "12")


def test_accuracy_reward_with_trl_calling_convention_and_string_completions():
    completions = [r"... so \boxed{12}", "The answer is 12 cm.", "I think it is 13.", "Nothing to say"]
    rewards = accuracy_reward(
        prompts=["Q"] * 4,
        completions=completions,
        completion_ids=[[1, 2]] * 4,
        answer=["12"] * 4,
        images=[None] * 4,  # other dataset columns arrive as keyword arguments too
    )
    assert rewards == [1.0, 1.0, 0.0, 0.0]


def test_accuracy_reward_with_conversational_completions():
    prompts = [[{"role": "user", "content": "Q"}]] * 3
    completions = [
        [{"role": "assistant", "content": r"Therefore \boxed{\frac{1}{2}}."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "The answer is (B)."}]}],
        [{"role": "assistant", "content": "The answer is 0.6"}],
    ]
    rewards = accuracy_reward(
        prompts=prompts, completions=completions, completion_ids=[[0]] * 3, answer=["0.5", "B", "0.5"]
    )
    assert rewards == [1.0, 1.0, 0.0]


def test_accuracy_reward_requires_one_answer_per_completion():
    with pytest.raises(ValueError):
        accuracy_reward(completions=["1", "2"], answer=["1"])


class CyclingGenerate:
    """Deterministic stand-in for a sampler: for each question, cycles through a fixed list of responses."""

    def __init__(self, responses_by_question):
        self._cycles = {question: itertools.cycle(responses) for question, responses in responses_by_question.items()}
        self.calls = []

    def __call__(self, rows):
        self.calls.append([row["question"] for row in rows])
        return [next(self._cycles[row["question"]]) for row in rows]


def _rows():
    return [
        {"question": "always right", "answer": "4"},
        {"question": "half right", "answer": r"\frac{1}{2}"},
        {"question": "never right", "answer": "B"},
    ]


def test_avg_at_k_known_values():
    generate = CyclingGenerate(
        {
            "always right": [r"\boxed{4}"],
            "half right": ["The answer is 0.5", "The answer is 0.25"],
            "never right": ["(A)"],
        }
    )
    result = avg_at_k(generate, _rows(), k=4, batch_size=3)

    assert result["per_row"] == [1.0, 0.5, 0.0]
    assert result["avg@k"] == pytest.approx(0.5)
    assert result["pass@k"] == pytest.approx(2 / 3)
    assert result["k"] == 4
    assert result["num_rows"] == 3
    # every row is sampled k times, in batches of at most batch_size that may span rows
    assert [len(call) for call in generate.calls] == [3, 3, 3, 3]
    flat = [question for call in generate.calls for question in call]
    assert flat == ["always right"] * 4 + ["half right"] * 4 + ["never right"] * 4


def test_avg_at_k_on_a_datasets_dataset_with_custom_answer_column():
    dataset = Dataset.from_list([{"question": row["question"], "solution": row["answer"]} for row in _rows()])
    generate = CyclingGenerate({"always right": ["4"], "half right": ["1/2"], "never right": ["C"]})
    result = avg_at_k(generate, dataset, k=2, answer_column="solution")
    assert result["per_row"] == [1.0, 1.0, 0.0]
    assert result["avg@k"] == pytest.approx(2 / 3)
    assert result["pass@k"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"k": 0}, "positive"), ({"batch_size": 0}, "positive")],
)
def test_avg_at_k_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        avg_at_k(lambda rows: ["4"] * len(rows), _rows(), **kwargs)


def test_avg_at_k_rejects_empty_dataset_and_wrong_number_of_completions():
    with pytest.raises(ValueError, match="empty"):
        avg_at_k(lambda rows: [], [], k=2)
    with pytest.raises(ValueError, match="returned 1 completions for 2 rows"):
        avg_at_k(lambda rows: ["4"], _rows(), k=2, batch_size=2)


@pytest.fixture(scope="module")
def tiny_qwen(tokenizer):
    """A tiny random Qwen2.5-VL whose tokenizer pads on the right, to check that generation pads on the left."""
    from trl_vaopd.tiny_models import build_tiny_vlm

    # A private copy: the session tokenizer is shared with other tests.
    model, processor = build_tiny_vlm("qwen2_5_vl", tokenizer=copy.deepcopy(tokenizer))
    processor.tokenizer.padding_side = "right"
    return model.eval(), processor


def _trainer_rows():
    images = [Image.new("RGB", (32, 32), color) for color in ("red", "blue")]
    return [
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "images": [images[0]], "answer": "4"},
        {
            "prompt": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. How many legs?"}],
            "images": images,
            "answer": "4",
        },
    ]


def test_make_hf_generate_decodes_only_new_tokens_with_left_padding(tiny_qwen):
    model, processor = tiny_qwen
    rows = _trainer_rows()
    # A temperature this low makes sampling effectively greedy, so a row generated alone and the same row generated
    # in a padded batch agree only if the padding is on the left.
    generate = make_hf_generate(model, processor, max_new_tokens=6, temperature=1e-4)

    torch.manual_seed(0)
    batched = generate(rows)
    alone = [generate([row])[0] for row in rows]

    assert len(batched) == 2 and all(isinstance(text, str) for text in batched)
    assert batched == alone
    for text in batched:  # the prompt is not part of the completion
        assert "What is 2 + 2?" not in text and "quick brown fox" not in text


def test_make_hf_generate_feeds_avg_at_k(tiny_qwen):
    model, processor = tiny_qwen
    generate = make_hf_generate(model, processor, max_new_tokens=3)
    torch.manual_seed(0)
    result = avg_at_k(generate, _trainer_rows(), k=2, batch_size=3)
    assert result["num_rows"] == 2 and len(result["per_row"]) == 2
    assert 0.0 <= result["avg@k"] <= result["pass@k"] <= 1.0
