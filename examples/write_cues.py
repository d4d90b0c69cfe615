# Copyright 2026 The trl_vaopd authors. Licensed under the Apache License, Version 2.0.
"""
Write ViCuR's cue column for a dataset with any vision-language model, and save it for `train_vaopd.py`.

```bash
python examples/write_cues.py --dataset_name geometry3k --cue_model Qwen/Qwen3-VL-8B-Instruct \
    --output data/geometry3k_cues.parquet
```

The dataset is loaded with `trl_vaopd.dataset_formats.load_vaopd_dataset` (a hub name, a local file or directory);
`trl_vaopd.cues.generate_cues` asks the model, for each row, for the question-relevant visual evidence without the
answer. Progress goes to `<output>.progress.jsonl`: rerun the same command after an interruption to resume.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from trl_vaopd.cues import DEFAULT_CUE_INSTRUCTION, generate_cues
from trl_vaopd.dataset_formats import load_vaopd_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--dataset_name", required=True, help="Hub name, local file or directory (load_vaopd_dataset)")
    parser.add_argument("--dataset_split", default="train")
    parser.add_argument("--dataset_image_root", default=None, help="Directory of images shipped apart (ViRL39K)")
    parser.add_argument("--cue_model", required=True, help="The VLM that writes the cues (name or path)")
    parser.add_argument("--output", required=True, help="Parquet file to write, with the new column")
    parser.add_argument("--column", default="cue")
    parser.add_argument("--instruction", default=DEFAULT_CUE_INSTRUCTION, help="Must contain {question}")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    dataset = load_vaopd_dataset(args.dataset_name, split=args.dataset_split, image_root=args.dataset_image_root)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    device_map = "auto" if torch.cuda.is_available() else None
    model = AutoModelForImageTextToText.from_pretrained(args.cue_model, dtype=dtype, device_map=device_map)
    processor = AutoProcessor.from_pretrained(args.cue_model, padding_side="left")
    with_cues = generate_cues(
        dataset,
        model,
        processor,
        instruction=args.instruction,
        column=args.column,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        progress_file=f"{args.output}.progress.jsonl",
    )
    with_cues.to_parquet(args.output)
    print(f"Wrote {len(with_cues)} rows with a {args.column!r} column to {args.output}")


if __name__ == "__main__":
    main(parse_args())
