"""Math-style answer checking and avg@k evaluation for vision-language reasoning benchmarks.

The VA-OPD paper reports avg@8: every question is answered 8 times with sampling at temperature 1.0 and the
accuracy is averaged over all samples. This module provides the pieces for that protocol:

- [`extract_answer`] pulls the final answer out of a free-form response,
- [`normalize_answer`] and [`answers_match`] decide whether it agrees with the reference,
- [`accuracy_reward`] wraps both as a TRL reward function,
- [`avg_at_k`] runs the avg@k / pass@k evaluation on top of any generation callable, and
- [`make_hf_generate`] builds such a callable around `transformers` `model.generate`.

Mathematical equivalence is decided by `math-verify`, the library TRL's own `accuracy_reward` uses (LaTeX and plain
expressions parsed to SymPy, compared numerically and symbolically). This module adds what it does not cover: answer
extraction from free-form reasoning ("the answer is ...", multiple-choice letters, the last number, under a first- or
last-answer policy), units and degree marks, and choice letters.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, Literal

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify


__all__ = [
    "ANSWER_POLICIES",
    "accuracy_reward",
    "answers_match",
    "avg_at_k",
    "extract_answer",
    "first_boxed_content",
    "last_boxed_content",
    "make_hf_generate",
    "normalize_answer",
    "tokenize_conversations",
]

#: Which committed answer of a response counts: the last one (a model correcting itself), or the first one (the
#: protocol of the VA-OPD reference evaluation: the first `\boxed{}` or "Answer:" in output order)
ANSWER_POLICIES = ("last", "first")
AnswerPolicy = Literal["last", "first"]

# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------------

_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)\b")

# The phrase only: what follows it is read up to the end of its line and sentence, so that a later phrase on the same
# line ("The answer is 7. The answer is 9.") is found too
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
# A period ends the answer sentence only when followed by whitespace or the end, so decimals such as 3.5 survive.
_SENTENCE_END = re.compile(r"\.(?=\s|$)")

# Multiple-choice forms, from most to least explicit. A bare letter followed by a period ("B.") is only accepted on a
# line of its own: in geometry solutions "... through point B." is far more common than an option label.
_CHOICE_PATTERNS = (
    re.compile(r"\((?P<letter>[A-Z])\)"),
    re.compile(r"\b(?i:option|choice)\b\s*:?\s*\(?(?P<letter>[A-Z])\b\)?"),
    re.compile(r"^[ \t]*\(?(?P<letter>[A-Z])\)?[.):]?[ \t]*$", re.MULTILINE),
)

_PLAIN_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# One level of nested braces covers `\frac{\sqrt{3}}{2}`; deeper nesting in a bare (unboxed) answer is rare.
_BRACED = r"\{(?:[^{}]|\{[^{}]*\})*\}"
_NUMBER = re.compile(
    # Not glued to a word or a decimal point, and not an exponent such as the 2 of "units^2" or "m^{2}".
    r"(?<![\w.\\^])(?<!\^\{)-?(?:"
    rf"\\[dt]?frac{_BRACED}{_BRACED}"  # \frac{3}{4}, \dfrac{\sqrt{3}}{2}
    rf"|(?:{_PLAIN_NUMBER})?\s*\\sqrt(?:{_BRACED}|\d)"  # 2\sqrt{3}, \sqrt{2}, \sqrt3
    rf"|(?:{_PLAIN_NUMBER})(?:\s*/\s*(?:{_PLAIN_NUMBER}))?(?:\s*\\pi)?"  # 12, -3.5, 1,000, 3/4, 2\pi
    r")"
)


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """`(start, end, content)` of every complete `\boxed{...}` / `\fbox{...}` (braces matched with a counter, so
    nested groups such as `\boxed{\frac{1}{2}}` stay whole; the brace-less `\boxed 5` too; an unterminated box, a
    truncated generation, is left out)."""
    spans = []
    for command in _BOXED_COMMAND.finditer(text):
        start = command.end()
        while start < len(text) and text[start].isspace():
            start += 1
        if start >= len(text):
            continue
        if text[start] != "{":
            argument = re.match(r"[^\s$]+", text[start:])
            if argument:
                spans.append((command.start(), start + argument.end(), argument.group()))
            continue
        depth = 0
        for position in range(start, len(text)):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    spans.append((command.start(), position, text[start + 1 : position]))
                    break
    return spans


def last_boxed_content(text: str) -> str | None:
    r"""Return the content of the last `\boxed{...}` (or `\fbox{...}`) in `text`, or `None` if there is none.

    "Last" means the box that closes last, so a box nested in another yields the outer one. The brace-less form
    `\boxed 5` is accepted too. An unterminated box (a truncated generation) is ignored.
    """
    spans = _boxed_spans(text)
    return max(spans, key=lambda span: span[1])[2] if spans else None


def first_boxed_content(text: str) -> str | None:
    r"""Return the content of the first `\boxed{...}` (or `\fbox{...}`) in output order, or `None`."""
    spans = _boxed_spans(text)
    return min(spans)[2] if spans else None


def _answer_after_phrase(text: str, policy: AnswerPolicy = "last") -> tuple[int, str] | None:
    """`(position, answer)` of the last (or first) "the answer is" / "Answer:", up to the end of its sentence."""
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    match = matches[-1] if policy == "last" else matches[0]
    candidate = text[match.end() :].split("\n", 1)[0]
    sentence_end = _SENTENCE_END.search(candidate)
    if sentence_end:
        candidate = candidate[: sentence_end.start()]
    # Markdown emphasis ("**12**") is decoration, not part of the answer.
    candidate = candidate.strip().strip("*").strip()
    return (match.start(), candidate) if candidate else None


def _choice_letter_in(text: str, policy: AnswerPolicy = "last") -> str | None:
    found = [(m.start("letter"), m.group("letter")) for pattern in _CHOICE_PATTERNS for m in pattern.finditer(text)]
    if not found:
        return None
    return (max(found) if policy == "last" else min(found))[1]


def extract_answer(text: str, policy: AnswerPolicy = "last") -> str | None:
    r"""Extract the final answer from a model response.

    Strategies are tried in order of how explicitly the model marked its answer:

    1. a `\boxed{...}` / `\fbox{...}` (nested braces allowed), or the text after "the answer is" / "Answer:"
       (case-insensitive, up to the end of that sentence): with `policy="last"` the last box, else the last phrase;
       with `policy="first"` whichever of the two comes first in the response;
    2. a multiple-choice letter written as "(B)", "option B" / "choice B", or alone on a line ("B." / "B");
    3. a number, which may be signed, decimal, use thousands separators, or be a fraction (`3/4`, `\frac{3}{4}`,
       `\dfrac{3}{4}`), a radical (`2\sqrt{3}`) or a multiple of `\pi`. Trailing units such as "cm", "degrees" or
       "°" are left out.

    Steps 2 and 3 take the last (or, with `policy="first"`, the first) occurrence.

    Args:
        text: The model response.
        policy: `"last"` (the last committed answer, a model correcting itself) or `"first"` (the first committed
            answer in output order, the protocol of the VA-OPD reference evaluation).

    Returns:
        The answer as written by the model (not normalised), or `None` when no answer can be found.

    Example:
        ```python
        >>> extract_answer(r"So the area is \boxed{\frac{1}{2}}.")
        '\\frac{1}{2}'
        >>> extract_answer("The answer is 12 cm.")
        '12 cm'
        >>> extract_answer(r"Answer: 3. Checking again, \boxed{4}", policy="first")
        '3'
        ```
    """
    if policy not in ANSWER_POLICIES:
        raise ValueError(f"policy must be one of {ANSWER_POLICIES}, got {policy!r}.")
    text = text.replace("\u2212", "-")  # Unicode minus sign, common in model output
    boxes = [(start, content.strip()) for start, _, content in _boxed_spans(text) if content.strip()]
    phrase = _answer_after_phrase(text, policy)
    if policy == "last":
        if boxes:
            return last_boxed_content(text).strip()
        if phrase is not None:
            return phrase[1]
    else:
        committed = [*boxes, *([phrase] if phrase is not None else [])]
        if committed:
            return min(committed)[1]
    letter = _choice_letter_in(text, policy)
    if letter is not None:
        return letter
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return (numbers[-1] if policy == "last" else numbers[0]).strip()


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------------

# Commands whose argument is kept while the command itself is dropped.
_UNWRAP_COMMANDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_REMOVED_LATEX = (
    r"\left",
    r"\right",
    r"\displaystyle",
    r"\!",
    r"\,",
    r"\;",
    r"\:",
    r"\ ",
    r"\(",
    r"\)",
    r"\[",
    r"\]",
    "$",
)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°")
_PERCENT = re.compile(r"\\?%")
_UNIT_WORDS = (
    "square units|square unit|sq units|units|unit|"
    "square centimeters|square meters|square feet|square inches|"
    "centimeters|centimetres|millimeters|millimetres|kilometers|kilometres|meters|metres|"
    "cm|mm|km|m|inches|inch|in|feet|foot|ft|yards|yd|miles|mi|"
    "degrees|degree|deg|radians|rad"
)
# A unit is only stripped from the end and only after a number-like token, so answers such as "m" or "in" survive.
_TRAILING_UNIT = re.compile(rf"(?<=[\d}}])\s*(?:{_UNIT_WORDS})(?:\^\s*\{{?\d\}}?|²|³)?\s*$", re.IGNORECASE)
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PARENTHESISED_LETTER = re.compile(r"^\(([a-z])\)$")


def _clean_answer(ans: str) -> str:
    """`normalize_answer` without the case folding: still LaTeX, for math-verify."""
    boxed = last_boxed_content(ans)
    text = boxed if boxed is not None else ans
    text = text.replace("\u2212", "-")
    previous = None
    while previous != text:  # nested wrappers such as \text{\textbf{cm}}
        previous = text
        text = _UNWRAP_COMMANDS.sub(r"\1", text)
    for token in _REMOVED_LATEX:
        text = text.replace(token, "")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = _DEGREES.sub("", text)
    text = _PERCENT.sub("", text)
    text = text.strip().rstrip(".,;:!?").strip()
    text = _TRAILING_UNIT.sub("", text).strip()
    # "x = 5" or "m\angle ABC = 60": the value is what follows the last "=".
    if "=" in text and text.rsplit("=", 1)[1].strip():
        text = text.rsplit("=", 1)[1]
    text = _THOUSANDS_SEPARATOR.sub("", text)
    return re.sub(r"\s+", "", text).rstrip(".,;:!?")


def normalize_answer(ans: str) -> str:
    r"""Normalise an answer string so that equivalent notations compare equal as strings.

    Removes `\boxed{}` wrappers, math delimiters (`$`, `\(`, `\[`), `\text{}`-style wrappers, `\left`/`\right`,
    spacing commands, degree marks (`^\circ`, `°`), percent signs, trailing units ("cm", "units^2", "degrees", ...),
    trailing punctuation, thousands separators, an assignment's left side (`x = 5` -> `5`) and all whitespace;
    `\dfrac` and `\tfrac` become `\frac`. The result is lower-cased, which makes choice letters and yes/no answers
    case-insensitive, and a parenthesised choice letter "(B)" becomes "b".

    Args:
        ans: An extracted or reference answer.

    Returns:
        The normalised answer (possibly empty).
    """
    text = _clean_answer(ans).lower()
    letter = _PARENTHESISED_LETTER.match(text)
    return letter.group(1) if letter else text


# ---------------------------------------------------------------------------------------------------------------------
# Mathematical equivalence, by math-verify
# ---------------------------------------------------------------------------------------------------------------------

_MATH_TARGETS = (LatexExtractionConfig(), ExprExtractionConfig())
# Answers are short: anything longer is not one, and a tower of powers (10^{10^{10}}) would keep SymPy busy until
# math-verify's timeout, which exists in the main thread only
_MAX_MATH_LENGTH = 200
_POWER_TOWER = re.compile(r"\^\s*\{[^{}]*\^")


def _math_equal(predicted: str, expected: str) -> bool:
    """Whether math-verify finds the two (cleaned) answers mathematically equal."""
    if any(len(a) > _MAX_MATH_LENGTH or _POWER_TOWER.search(a) for a in (predicted, expected)):
        return False
    # math-verify times out with signal.alarm, which only the main thread may use (as in TRL's accuracy_reward)
    main = threading.current_thread() is threading.main_thread()
    if not main:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    timeout = 5 if main else None
    gold = parse(f"${expected}$", _MATH_TARGETS, parsing_timeout=timeout)
    answer = parse(f"${predicted}$", _MATH_TARGETS, parsing_timeout=timeout)
    return bool(gold) and bool(answer) and verify(gold, answer, timeout_seconds=timeout)


# ---------------------------------------------------------------------------------------------------------------------
# Matching and rewards
# ---------------------------------------------------------------------------------------------------------------------

# A choice given as "B", "B.", "(B)", "B) 12 cm", "option B": the letter must be delimited so that words such as
# "Bob" or "a cat" are not read as options.
_CHOICE_ANSWER = re.compile(r"^\s*(?:(?:option|choice)\s*:?\s*)?(?:\(([a-z])\)|([a-z])(?=[.):]|\s*$))", re.IGNORECASE)


def _choice_letter(answer: str) -> str | None:
    match = _CHOICE_ANSWER.match(answer.replace("$", ""))
    if match is None:
        return None
    return (match.group(1) or match.group(2)).lower()


def answers_match(prediction: str | None, reference: str) -> bool:
    r"""Whether a predicted answer agrees with the reference answer.

    The answers match when their [`normalize_answer`] forms are identical, when the reference is a choice letter and
    the prediction names the same letter ("B", "(B)", "B. 12 cm", "option b"), or when `math-verify` finds them
    mathematically equal (units, degree marks and `x =` removed first): integers, decimals (equal after rounding to
    6 decimals), fractions (`3/4`, `\frac{3}{4}`), radicals (`2\sqrt{3}`, `\frac{\sqrt{3}}{2}`), multiples of
    `\pi`, and symbolic expressions (`x + 1` and `1 + x`).

    Args:
        prediction: The extracted answer, typically from [`extract_answer`]; `None` (nothing extracted) never matches.
        reference: The reference answer.

    Returns:
        `True` if the answers agree.
    """
    if prediction is None:
        return False
    predicted, expected = normalize_answer(prediction), normalize_answer(reference)
    if not predicted or not expected:
        return False
    if predicted == expected:
        return True
    if len(expected) == 1 and expected.isalpha():
        return _choice_letter(prediction) == expected
    return _math_equal(_clean_answer(prediction), _clean_answer(reference))


def _completion_text(completion: str | list[dict[str, Any]]) -> str:
    """Text of a completion, which TRL passes as a string or, for conversational data, as a list of messages."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, str):
        return content
    # Structured content: [{"type": "text", "text": ...}, ...]
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def accuracy_reward(
    completions: Sequence[str | list[dict[str, Any]]],
    answer: Sequence[Any],
    policy: AnswerPolicy = "last",
    **kwargs: Any,
) -> list[float]:
    """Binary accuracy reward: 1.0 when the completion's final answer matches the reference, else 0.0.

    The signature follows TRL's reward-function convention, so the function can be passed directly as
    `reward_funcs=accuracy_reward`: TRL calls it with `prompts=`, `completions=`, `completion_ids=` and every
    dataset column as a keyword argument, and this function reads the `answer` column. It is equally usable for
    offline evaluation.

    Args:
        completions: Completions, either plain strings or conversational lists such as
            `[{"role": "assistant", "content": "..."}]`.
        answer: One reference answer per completion.
        policy: Which committed answer counts, `"last"` or `"first"` (see [`extract_answer`]).
        **kwargs: Other arguments passed by the trainer (`prompts`, `completion_ids`, remaining dataset columns);
            unused.

    Returns:
        One reward per completion.
    """
    return [
        1.0 if answers_match(extract_answer(_completion_text(completion), policy), str(reference)) else 0.0
        for completion, reference in zip(completions, answer, strict=True)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# avg@k evaluation
# ---------------------------------------------------------------------------------------------------------------------


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    # itertools.batched only exists from Python 3.12 on; the package supports 3.10.
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def avg_at_k(
    generate: Callable[[list[dict[str, Any]]], list[str]],
    dataset: Iterable[dict[str, Any]],
    k: int = 8,
    answer_column: str = "answer",
    batch_size: int = 8,
    policy: AnswerPolicy = "last",
) -> dict[str, Any]:
    """Evaluate avg@k and pass@k: sample `k` answers per question and score each one with [`accuracy_reward`].

    The caller owns the sampling: `generate` should sample at the temperature the protocol prescribes (the VA-OPD
    paper uses temperature 1.0 with k=8) so that the k samples of a row differ. [`make_hf_generate`] builds a suitable
    callable for a `transformers` model.

    Args:
        generate: Takes a list of dataset rows (each row appears up to `k` times, possibly split across calls) and
            returns exactly one completion string per row, in order.
        dataset: Rows to evaluate, e.g. a `datasets.Dataset` formatted by `trl_vaopd.dataset_formats`.
        k: Number of samples per row.
        answer_column: Column holding the reference answer.
        batch_size: Number of rows passed to each `generate` call.
        policy: Which committed answer of a completion counts, `"last"` or `"first"` (see [`extract_answer`]).

    Returns:
        A dictionary with `"avg@k"` (mean accuracy over all samples), `"pass@k"` (fraction of rows with at least one
        correct sample), `"per_row"` (accuracy of each row), `"k"` and `"num_rows"`.

    Raises:
        ValueError: If `k` or `batch_size` is not positive, the dataset is empty, or `generate` returns the wrong
            number of completions.
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive, got k={k} and batch_size={batch_size}.")
    correct_per_row: list[int] = []
    requests = ((index, row) for index, row in enumerate(dataset) for _ in range(k))
    for batch in _batched(requests, batch_size):
        rows = [row for _, row in batch]
        completions = generate(rows)
        if len(completions) != len(rows):
            raise ValueError(f"`generate` returned {len(completions)} completions for {len(rows)} rows.")
        rewards = accuracy_reward(completions, [row[answer_column] for row in rows], policy)
        for (index, _), reward in zip(batch, rewards, strict=True):
            if index == len(correct_per_row):  # first sample of a new row: requests arrive in row order
                correct_per_row.append(0)
            correct_per_row[index] += int(reward)
    if not correct_per_row:
        raise ValueError("Cannot evaluate an empty dataset.")
    per_row = [correct / k for correct in correct_per_row]
    return {
        "avg@k": sum(per_row) / len(per_row),
        "pass@k": sum(correct > 0 for correct in correct_per_row) / len(correct_per_row),
        "per_row": per_row,
        "k": k,
        "num_rows": len(per_row),
    }


def tokenize_conversations(processor: Any, conversations: list[list[dict[str, Any]]]) -> Any:
    """Chat-template and tokenize conversations for generation, as a batch of tensors.

    Left padding keeps every prompt flush against what follows it, as decoder-only generation and the scoring of
    prompt + response both require.
    """
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    )


def make_hf_generate(
    model: Any,
    processor: Any,
    max_new_tokens: int = 2048,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prompt_column: str = "prompt",
    image_column: str = "images",
) -> Callable[[list[dict[str, Any]]], list[str]]:
    """Build a `generate` callable for [`avg_at_k`] that samples from a `transformers` vision-language model.

    Rows are expected in the trainer's format: a conversational `prompt` (list of messages with plain-text content)
    and an `images` column holding a list of PIL images (a single image is accepted too). Images are inserted into
    the first user message exactly as TRL does during training (`trl.data_utils.prepare_multimodal_messages`), the
    batch is tokenised with the processor's chat template and left padding, and completions are sampled with
    `do_sample=True`.

    Args:
        model: A generative model such as `Qwen2_5_VLForConditionalGeneration`.
        processor: The matching processor (with a chat template).
        max_new_tokens: Maximum completion length. Reasoning traces are long; truncated answers count as wrong.
        temperature: Sampling temperature (the VA-OPD protocol uses 1.0).
        top_p: Nucleus-sampling threshold.
        prompt_column: Column holding the conversational prompt.
        image_column: Column holding the images.

    Returns:
        A callable mapping a list of rows to one decoded completion per row (special tokens removed).
    """
    # Imported lazily so that answer checking does not pull in torch and TRL.
    import torch
    from trl.data_utils import prepare_multimodal_messages

    def generate(rows: list[dict[str, Any]]) -> list[str]:
        conversations = []
        for row in rows:
            images = row.get(image_column)
            if images is not None and not isinstance(images, list):
                images = [images]
            conversations.append(prepare_multimodal_messages(row[prompt_column], images=images))
        inputs = tokenize_conversations(processor, conversations).to(model.device)
        with torch.inference_mode():
            output_ids = model.generate(
                **inputs, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
            )
        completion_ids = output_ids[:, inputs["input_ids"].shape[1] :]
        return processor.batch_decode(completion_ids, skip_special_tokens=True)

    return generate
