"""Which vocabulary a student and a teacher are compared over, when their output heads differ in size.

Checkpoints pad their output heads beyond the tokenizer's vocabulary to hardware-friendly sizes, and not always to the
same size within a family (Qwen2.5-VL-3B has 151936 rows, 7B 152064, both for the same 151665-token tokenizer).
Distillation compares next-token distributions token by token, so what must match is the tokenizer, not the padding:
heads of equal size are compared over all their rows (as TRL does); heads of different sizes over the tokenizer's
tokens, the leading rows both share.
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase


__all__ = ["compared_vocab_size", "load_tokenizer_of"]


def load_tokenizer_of(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer saved with a model (hub name or local path), or `None` when the model ships none."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # no tokenizer files next to the weights: nothing to compare
        return None


def compared_vocab_size(
    student_rows: int,
    teacher_rows: int,
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> int | None:
    """The number of leading output-head rows to compare, or `None` for all of them (heads of equal size).

    Args:
        student_rows, teacher_rows: rows of the student's and the teacher's output heads.
        tokenizer: the student's tokenizer (the trainer's processing class).
        teacher_tokenizer: the teacher's own tokenizer when known (a teacher given by name or path); `None` when the
            teacher was passed as a model object, whose tokenizer is then taken to be the student's.

    Raises:
        ValueError: if the tokenizers differ (naming both sizes), or a head has fewer rows than the tokenizer has
            tokens.
    """
    size = len(tokenizer)
    if teacher_tokenizer is not None and (
        len(teacher_tokenizer) != size or teacher_tokenizer.get_vocab() != tokenizer.get_vocab()
    ):
        raise ValueError(
            f"The teacher's tokenizer ({len(teacher_tokenizer)} tokens) differs from the student's ({size} tokens). "
            "Distillation compares next-token distributions token by token, so both models must share a tokenizer: "
            "use a teacher of the student's family, or trl.experimental.gold for cross-tokenizer distillation."
        )
    for name, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < size:
            raise ValueError(
                f"The {name}'s output head has {rows} rows but the tokenizer has {size} tokens, so some tokens have "
                f"no logit. Use the {name} checkpoint that belongs to this tokenizer."
            )
    return None if student_rows == teacher_rows else size
