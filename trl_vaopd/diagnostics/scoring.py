"""Per-token visual advantage (VA) of any model: (image, prompt, response) triples scored under the original image and a
counterfactual view, keeping each token's positive log-probability gap (VA-OPD's VA, `docs/methods/va_opd.md`, with any
model as scorer)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin
from trl.data_utils import prepare_multimodal_messages

from ..chunked import OutputHead, token_logprobs
from ..dataset_formats import row_images
from ..evaluation import tokenize_conversations
from ..objective import visual_advantage
from ..views import get_view


__all__ = ["TokenVA", "score_many", "score_visual_advantage"]

ImageInput = Image.Image | Sequence[Image.Image] | None
Prompt = str | list[dict[str, Any]]
Response = str | Sequence[int]
#: A row to score: `(image, prompt, response)`, or a mapping with `"prompt"`, `"response"` and `"images"` or `"image"`
#: (a row of a VA-OPD dataset with a response added).
Row = tuple[ImageInput, Prompt, Response] | Mapping[str, Any]
VAValues = torch.Tensor | np.ndarray | Sequence[float] | Sequence["TokenVA"]


@dataclass(frozen=True)
class TokenVA:
    """Per-token visual advantage of one response under one scoring model.

    Attributes:
        tokens: the response tokens, each decoded on its own (special tokens such as the final EOS included).
        token_ids: `(T,)` their ids.
        logp_original: `(T,)` log-probabilities of the tokens given the original image.
        logp_counterfactual: `(T,)` the same under the counterfactual view.
        va: `(T,)` visual advantage `max(logp_original - logp_counterfactual, 0)`.
    """

    tokens: list[str]
    token_ids: torch.Tensor
    logp_original: torch.Tensor
    logp_counterfactual: torch.Tensor
    va: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def mean_va(self) -> float:
        """Mean VA per token of the response (VA-OPD's `m_k` when the teacher scores)."""
        return float(self.va.double().mean()) if len(self) else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Scoring and sampling must not see dropout, and a model handed over by a trainer must go back to training
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_images(value: ImageInput) -> list[Image.Image]:
    if value is None:
        return []
    if isinstance(value, Image.Image):
        return [value]
    return list(value)


def _conversation(prompt: Prompt, images: list[Image.Image]) -> list[dict[str, Any]]:
    """A prompt (plain question or conversation) with `images` placed as TRL places them during training."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        # An image already inside the prompt would be left in place by the counterfactual view, hiding any VA
        if any(
            isinstance(part, Mapping) and part.get("image") is not None
            for message in prompt
            if isinstance(message.get("content"), list)
            for part in message["content"]
        ):
            raise ValueError(
                "The prompt holds an image of its own. Pass the images separately (the `image` of a row, or its "
                "`images` column) so that the counterfactual view can replace them."
            )
        messages = copy.deepcopy(prompt)
    return prepare_multimodal_messages(messages, images=images)


def _parse_row(row: Row) -> tuple[list[Image.Image], Prompt, Response]:
    if isinstance(row, Mapping):
        return row_images(row), row["prompt"], row["response"]
    image, prompt, response = row
    return _as_images(image), prompt, response


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _response_ids(tokenizer: Any, response: Response) -> list[int]:
    if isinstance(response, str):
        # Scored like a finished response: the tokens the model would have sampled, then its end-of-turn token
        ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    else:
        ids = [int(i) for i in response]
    if not ids:
        raise ValueError("A response to score needs at least one token.")
    return ids


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _to_model(inputs: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Processors return float32 pixels; a bf16 model needs them in its own dtype
    device, dtype = _model_device_dtype(model)
    return {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor)
    }


def _response_logprobs(
    model: torch.nn.Module,
    processor: ProcessorMixin,
    conversations: list[list[dict[str, Any]]],
    responses: list[list[int]],
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N, T)` log-probabilities of the response tokens after each prompt, and the `(N, T)` response mask."""
    inputs = _to_model(tokenize_conversations(processor, conversations), model)
    prompt_ids, prompt_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    n, prompt_len = prompt_ids.shape
    length = max(len(r) for r in responses)
    pad_id = _tokenizer(processor).pad_token_id
    response_ids = torch.full((n, length), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    response_mask = torch.zeros_like(response_ids)
    for i, ids in enumerate(responses):
        response_ids[i, : len(ids)] = torch.tensor(ids)
        response_mask[i, : len(ids)] = 1
    # Per-token fields (mm_token_type_ids, token_type_ids) mark the response as text, as TRL extends them
    for key, value in inputs.items():
        if value.shape == prompt_ids.shape:
            inputs[key] = torch.cat([value, value.new_zeros(response_ids.shape)], dim=1)
    # The multimodal backbone (vision injection included) without the LM head: the head runs on the response
    # positions only, in vocabulary tiles, like the trainer's teacher scoring
    unwrapped = model.get_base_model() if is_peft_model(model) else model
    hidden = unwrapped.base_model(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        use_cache=False,
        **inputs,
    ).last_hidden_state
    # Position p predicts token p + 1: the last prompt position predicts the first response token
    hidden = hidden[:, prompt_len - 1 : prompt_len - 1 + length]
    return token_logprobs(hidden, OutputHead.of(model), response_ids, response_mask, temperature), response_mask


def score_many(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: Sequence[Row],
    *,
    view: str | Callable[[Image.Image], Image.Image] = "pixelate",
    pixelate_ratio: float = 0.1,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[TokenVA]:
    """Per-token visual advantage of many responses under one model, in batches.

    Each row is scored twice with the same prompt and response: with its image(s), and with the counterfactual view
    of each image (`"drop"`: no image at all). The gap is VA-OPD's VA with `model` as the scorer: the teacher's VA
    when `model` is the teacher, a student's own visual reliance when it is a student.

    Args:
        model: any vision-language model whose `base_model` returns `last_hidden_state` (the models TRL's
            `DistillationTrainer` supports), possibly a PEFT model. Run in eval mode without gradients; its mode is
            restored afterwards.
        processor: the model's processor (with a chat template).
        rows: `(image, prompt, response)` triples or mappings with `"prompt"`, `"response"` and `"images"` /
            `"image"`. The image may be one PIL image, a list or `None`; the prompt a question string (placed after
            the image in one user turn) or a conversation in the VA-OPD dataset format; the response a string
            (tokenised without special tokens, then the tokenizer's EOS appended, as a finished response) or the token
            ids to score as they are (e.g. sampled completions).
        view: counterfactual view: `"pixelate"`, `"blur"`, `"blank"`, `"drop"` or a callable image -> image.
        pixelate_ratio: side-length ratio of the `"pixelate"` view.
        temperature: probability temperature of the log-probabilities (VA-OPD: 1).
        batch_size: rows per forward pass.

    Returns:
        One [`TokenVA`] per row, in order, on CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    counterfactual = get_view(view, pixelate_ratio)
    tokenizer = _tokenizer(processor)
    parsed = [_parse_row(row) for row in rows]
    results: list[TokenVA] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(parsed), batch_size):
            batch = parsed[start : start + batch_size]
            responses = [_response_ids(tokenizer, response) for _, _, response in batch]
            originals = [_conversation(prompt, images) for images, prompt, _ in batch]
            views = [
                _conversation(prompt, [counterfactual(i) for i in images] if counterfactual.keeps_layout else [])
                for images, prompt, _ in batch
            ]
            logp_original, mask = _response_logprobs(model, processor, originals, responses, temperature)
            logp_counterfactual, _ = _response_logprobs(model, processor, views, responses, temperature)
            va = visual_advantage(logp_original, logp_counterfactual, mask)
            for i, ids in enumerate(responses):
                n = len(ids)
                results.append(
                    TokenVA(
                        tokens=tokenizer.batch_decode([[t] for t in ids]),
                        token_ids=torch.tensor(ids),
                        logp_original=logp_original[i, :n].cpu(),
                        logp_counterfactual=logp_counterfactual[i, :n].cpu(),
                        va=va[i, :n].cpu(),
                    )
                )
    return results


def score_visual_advantage(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    image: ImageInput,
    prompt: Prompt,
    response: Response,
    view: str | Callable[[Image.Image], Image.Image] = "pixelate",
    pixelate_ratio: float = 0.1,
    temperature: float = 1.0,
) -> TokenVA:
    """Per-token visual advantage of one response under `model`; see [`score_many`] for the arguments."""
    return score_many(
        model,
        processor,
        [(image, prompt, response)],
        view=view,
        pixelate_ratio=pixelate_ratio,
        temperature=temperature,
    )[0]
