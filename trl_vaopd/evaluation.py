"""Math-style answer checking and avg@k evaluation for vision-language reasoning benchmarks.

The VA-OPD paper reports avg@8: every question is answered 8 times with sampling at temperature 1.0 and the
accuracy is averaged over all samples. This module provides the pieces for that protocol:

- [`extract_answer`] pulls the final answer out of a free-form response,
- [`normalize_answer`] and [`answers_match`] decide whether it agrees with the reference,
- [`accuracy_reward`] wraps both as a TRL reward function,
- [`avg_at_k`] runs the avg@k / pass@k evaluation on top of any generation callable, and
- [`make_hf_generate`] builds such a callable around `transformers` `model.generate`.

Numeric answers are compared through a small, self-contained LaTeX-to-SymPy converter instead of
`sympy.parsing.latex.parse_latex` (which needs the optional ANTLR runtime) or `eval` (unsafe on model output).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import sympy


__all__ = [
    "accuracy_reward",
    "answers_match",
    "avg_at_k",
    "extract_answer",
    "last_boxed_content",
    "make_hf_generate",
    "normalize_answer",
    "tokenize_conversations",
]

# Relative tolerance for numeric agreement: loose enough for `2\sqrt{3}` vs `3.4641016`, tight enough that a
# two-decimal rounding of an irrational answer (e.g. 3.46) does not count as correct.
NUMERIC_RELATIVE_TOLERANCE = 1e-4

# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------------

_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)\b")

_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\s*:?|:)\s*(.+)", re.IGNORECASE)
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
_LAST_NUMBER = re.compile(
    # Not glued to a word or a decimal point, and not an exponent such as the 2 of "units^2" or "m^{2}".
    r"(?<![\w.\\^])(?<!\^\{)-?(?:"
    rf"\\[dt]?frac{_BRACED}{_BRACED}"  # \frac{3}{4}, \dfrac{\sqrt{3}}{2}
    rf"|(?:{_PLAIN_NUMBER})?\s*\\sqrt(?:{_BRACED}|\d)"  # 2\sqrt{3}, \sqrt{2}, \sqrt3
    rf"|(?:{_PLAIN_NUMBER})(?:\s*/\s*(?:{_PLAIN_NUMBER}))?(?:\s*\\pi)?"  # 12, -3.5, 1,000, 3/4, 2\pi
    r")"
)


def last_boxed_content(text: str) -> str | None:
    r"""Return the content of the last `\boxed{...}` (or `\fbox{...}`) in `text`, or `None` if there is none.

    Braces are matched with a counter rather than a regex so nested groups such as `\boxed{\frac{1}{2}}` are kept
    whole. "Last" means the box that closes last, so a box nested in another yields the outer one. The brace-less
    form `\boxed 5` is accepted too. An unterminated box (a truncated generation) is ignored.
    """
    last_end, last_content = -1, None
    for command in _BOXED_COMMAND.finditer(text):
        start = command.end()
        while start < len(text) and text[start].isspace():
            start += 1
        if start >= len(text):
            continue
        end, content = -1, None
        if text[start] != "{":
            argument = re.match(r"[^\s$]+", text[start:])
            if argument:
                end, content = start + argument.end(), argument.group()
        else:
            depth = 0
            for position in range(start, len(text)):
                if text[position] == "{":
                    depth += 1
                elif text[position] == "}":
                    depth -= 1
                    if depth == 0:
                        end, content = position, text[start + 1 : position]
                        break
        if content is not None and end > last_end:
            last_end, last_content = end, content
    return last_content


def _answer_after_phrase(text: str) -> str | None:
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    candidate = matches[-1].group(1)
    sentence_end = _SENTENCE_END.search(candidate)
    if sentence_end:
        candidate = candidate[: sentence_end.start()]
    # Markdown emphasis ("**12**") is decoration, not part of the answer.
    candidate = candidate.strip().strip("*").strip()
    return candidate or None


def _last_choice_letter(text: str) -> str | None:
    best_position, best_letter = -1, None
    for pattern in _CHOICE_PATTERNS:
        for match in pattern.finditer(text):
            if match.start("letter") > best_position:
                best_position, best_letter = match.start("letter"), match.group("letter")
    return best_letter


def extract_answer(text: str) -> str | None:
    r"""Extract the final answer from a model response.

    Strategies are tried in order of how explicitly the model marked its answer:

    1. the last `\boxed{...}` / `\fbox{...}` (nested braces allowed);
    2. the text after the last "the answer is" / "Answer:" (case-insensitive), up to the end of that sentence;
    3. a multiple-choice letter written as "(B)", "option B" / "choice B", or alone on a line ("B." / "B");
    4. the last number, which may be signed, decimal, use thousands separators, or be a fraction (`3/4`,
       `\frac{3}{4}`, `\dfrac{3}{4}`), a radical (`2\sqrt{3}`) or a multiple of `\pi`. Trailing units such as
       "cm", "degrees" or "°" are left out.

    Args:
        text: The model response.

    Returns:
        The answer as written by the model (not normalised), or `None` when no answer can be found.

    Example:
        ```python
        >>> extract_answer(r"So the area is \boxed{\frac{1}{2}}.")
        '\\frac{1}{2}'
        >>> extract_answer("The answer is 12 cm.")
        '12 cm'
        ```
    """
    text = text.replace("\u2212", "-")  # Unicode minus sign, common in model output
    boxed = last_boxed_content(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    phrase = _answer_after_phrase(text)
    if phrase is not None:
        return phrase
    letter = _last_choice_letter(text)
    if letter is not None:
        return letter
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


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
    text = re.sub(r"\s+", "", text).rstrip(".,;:!?").lower()
    letter = _PARENTHESISED_LETTER.match(text)
    return letter.group(1) if letter else text


# ---------------------------------------------------------------------------------------------------------------------
# Safe LaTeX -> SymPy conversion for numeric comparison
# ---------------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+|\\[a-z]+|[a-z]+|[-+*/^(){}\[\]]")
_OPERATOR_COMMANDS = {r"\cdot": "*", r"\times": "*", r"\div": "/"}
_MAX_INPUT_LENGTH = 200
_MAX_NESTING = 32
_MAX_RESULT_DIGITS = 1000


class _UnsupportedExpression(ValueError):
    """The answer is not a closed-form number in the supported LaTeX subset."""


def _tokenize(text: str) -> list[str]:
    text = text.replace("π", r"\pi").replace("√", r"\sqrt")
    tokens: list[str] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise _UnsupportedExpression(text)
        token = match.group()
        tokens.append(_OPERATOR_COMMANDS.get(token, token))
        position = match.end()
    return tokens


class _NumericLatexParser:
    r"""Recursive-descent parser for numeric LaTeX: numbers, `+ - * /`, `^`, parentheses, braces, `\frac`,
    `\sqrt` (with optional index), `\pi` and implicit multiplication (`2\sqrt{3}`, `3\pi`).

    It builds SymPy objects directly, so no text is ever evaluated; anything outside the grammar (variables,
    functions, relations) raises `_UnsupportedExpression`.
    """

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = tokens
        self._position = 0
        self._depth = 0

    def parse(self) -> sympy.Expr:
        expression = self._expression()
        if self._peek() is not None:
            raise _UnsupportedExpression(self._peek())
        return expression

    def _peek(self) -> str | None:
        return self._tokens[self._position] if self._position < len(self._tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        if token is None or (expected is not None and token != expected):
            raise _UnsupportedExpression(f"expected {expected!r}, got {token!r}")
        self._position += 1
        return token

    def _expression(self) -> sympy.Expr:
        value = self._term()
        while self._peek() in ("+", "-"):
            operator = self._take()
            value = value + self._term() if operator == "+" else value - self._term()
        return value

    def _term(self) -> sympy.Expr:
        value = self._unary()
        while True:
            token = self._peek()
            if token == "*":
                self._take()
                value = value * self._unary()
            elif token == "/":
                self._take()
                denominator = self._unary()
                if denominator == 0:
                    raise _UnsupportedExpression("division by zero")
                value = value / denominator
            elif token is not None and self._starts_atom(token):
                value = value * self._power()
            else:
                return value

    def _unary(self) -> sympy.Expr:
        if self._peek() == "-":
            self._take()
            return -self._unary()
        if self._peek() == "+":
            self._take()
            return self._unary()
        return self._power()

    def _power(self) -> sympy.Expr:
        base = self._atom()
        if self._peek() != "^":
            return base
        self._take()
        exponent = self._unary() if self._peek() in ("-", "+") else self._atom()
        # SymPy evaluates integer powers exactly, so an answer such as 10^{10^{10}} (or 0.5^{-10^{10}}) would build
        # an astronomically large number. Refuse results beyond _MAX_RESULT_DIGITS digits before computing them.
        magnitude = abs(float(base))
        if magnitude > 0 and abs(float(exponent) * math.log10(magnitude)) > _MAX_RESULT_DIGITS:
            raise _UnsupportedExpression("result too large")
        return base**exponent

    @staticmethod
    def _starts_atom(token: str) -> bool:
        return token[0].isdigit() or token[0] == "." or token in ("(", "{", r"\frac", r"\sqrt", r"\pi", "pi", "sqrt")

    def _atom(self) -> sympy.Expr:
        token = self._take()
        if token[0].isdigit() or token[0] == ".":
            return sympy.Rational(token)  # exact, so 0.1 + 0.2 == 0.3
        if token in (r"\pi", "pi"):
            return sympy.pi
        if token in ("(", "{"):
            return self._nested(")" if token == "(" else "}")
        if token == r"\frac":
            numerator = self._atom()
            denominator = self._atom()
            if denominator == 0:
                raise _UnsupportedExpression("division by zero")
            return numerator / denominator
        if token in (r"\sqrt", "sqrt"):
            if self._peek() == "[":
                self._take()
                index = self._nested("]")
                return sympy.root(self._atom(), index)
            return sympy.sqrt(self._atom())
        raise _UnsupportedExpression(token)

    def _nested(self, closing: str) -> sympy.Expr:
        self._depth += 1
        if self._depth > _MAX_NESTING:
            raise _UnsupportedExpression("nesting too deep")
        value = self._expression()
        self._take(closing)
        self._depth -= 1
        return value


def _to_number(normalized: str) -> float | None:
    """Evaluate a normalised answer to a real number, or return `None` if it is not a supported closed form."""
    if not normalized or len(normalized) > _MAX_INPUT_LENGTH:
        return None
    try:
        value = _NumericLatexParser(_tokenize(normalized)).parse()
        return float(value.evalf())
    except (_UnsupportedExpression, TypeError, OverflowError):
        # TypeError: a non-real value such as sqrt(-1), which float() refuses.
        return None


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
    the prediction names the same letter ("B", "(B)", "B. 12 cm", "option b"), or when both evaluate to real numbers
    within a relative tolerance of 1e-4. Numbers may be written as integers, decimals, fractions (`3/4`,
    `\frac{3}{4}`), radicals (`2\sqrt{3}`, `\frac{\sqrt{3}}{2}`) or multiples of `\pi`.

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
    predicted_value, expected_value = _to_number(predicted), _to_number(expected)
    if predicted_value is None or expected_value is None:
        return False
    return math.isclose(predicted_value, expected_value, rel_tol=NUMERIC_RELATIVE_TOLERANCE)


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
    completions: Sequence[str | list[dict[str, Any]]], answer: Sequence[Any], **kwargs: Any
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
        **kwargs: Other arguments passed by the trainer (`prompts`, `completion_ids`, remaining dataset columns);
            unused.

    Returns:
        One reward per completion.
    """
    return [
        1.0 if answers_match(extract_answer(_completion_text(completion)), str(reference)) else 0.0
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
        rewards = accuracy_reward(completions, [row[answer_column] for row in rows])
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
