"""Batch generation with IVTP's pruned KV cache, streamed, against stock Llava with the same weights.

The model has LLaVA-1.5-7B's geometry and depth with narrow layers and random weights (see speed.py), so the
tokens are meaningless ids; what this shows is the mechanics: a left-padded batch of three prompts of different
lengths, each with its own image, generated with `generate` and a streamer that prints every step for every row;
the cache each layer holds after the run, and its size against stock Llava's cache. It ends with the cache bytes of
the real LLaVA-1.5-7B shape (576 image + 512 text tokens, fp16), computed from the shapes. Nothing is downloaded.

    python examples/generate.py [--max-new-tokens 32] [--preset configuration/llava-1.5-7b-ivtp.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from speed import ROOT, generated_image, model_and_stock
from transformers import CLIPImageProcessor
from transformers.generation.streamers import BaseStreamer

from llava_ivtp.measuring.analytic_flops import kv_cache_bytes_per_layer
from modeling_llava_ivtp import IvtpConfig
from modeling_llava_ivtp.cache_ivtp import cache_bytes
from modeling_llava_ivtp.transformers_compat import output_cache


class BatchStreamer(BaseStreamer):
    """Prints each generated step for every row of a batch (`TextStreamer` takes one row only)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.step = 0
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]

    def put(self, value: torch.Tensor) -> None:
        if value.ndim == 2 and value.shape[1] > 1:  # the prompt, sent once before the first step
            return
        tokens = value.reshape(self.batch_size).tolist()
        for row, token in enumerate(tokens):
            self.rows[row].append(token)
        self.step += 1
        print(f"  step {self.step:3d}: " + "  ".join(f"{token:5d}" for token in tokens), flush=True)

    def end(self) -> None:
        print(f"  done after {self.step} steps")


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, default=ROOT / "configuration" / "llava-1.5-7b-ivtp.json")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, stock = model_and_stock(args.preset)
    config = model.config

    # Three prompts: BOS, some text, the image's 576 placeholders, more text; different lengths, left-padded.
    image_token, patches = config.image_token_id, config.num_patches
    lengths = [(8, 24), (16, 56), (4, 12)]
    prompts = [
        [1] + torch.randint(3, 32000, (before,)).tolist() + [image_token] * patches
        + torch.randint(3, 32000, (after,)).tolist()
        for before, after in lengths
    ]
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, longest - len(prompt):] = 1
    images = [generated_image(), generated_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT),
              generated_image().rotate(90)]
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    settings = dict(
        max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        suppress_tokens=[image_token],
    )

    print(f"Prompts of {[len(p) for p in prompts]} tokens (left-padded to {longest}), one 336 px image each.")
    print(f"IVTP generate, {args.max_new_tokens} new tokens, streamed (token ids per row):")
    start = time.perf_counter()
    ours = model.generate(**inputs, streamer=BatchStreamer(len(prompts)), **settings)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = stock.generate(**inputs, **settings)
    stock_seconds = time.perf_counter() - start

    # The returned cache: `.cache` on transformers >= 5.24, `.past_key_values` on 5.23 (output_cache picks it).
    cache, stock_cache = output_cache(ours), output_cache(theirs)
    ours_bytes, stock_bytes = cache_bytes(cache), cache_bytes(stock_cache)
    # Real (not padding) tokens each layer holds per row: the 2-D mask, extended over the generated tokens.
    full_mask = torch.cat([attention_mask, torch.ones(len(prompts), cache.get_seq_length() - longest, dtype=torch.long)], 1)
    print("\nCache per layer after generation (slots = cached length incl. padding; real tokens per row; bytes):")
    print("| layer | IVTP slots | IVTP real tokens per row | IVTP bytes | stock slots | stock bytes |")
    print("|---|---|---|---|---|---|")
    for layer_idx, positions in enumerate(cache.layer_positions):
        real = (full_mask.gather(1, positions.clamp_min(0)).bool() & (positions >= 0)).sum(dim=1).tolist()
        slots, stock_slots = positions.shape[1], stock_cache.layers[layer_idx].keys.shape[-2]
        print(
            f"| {layer_idx} | {slots} | {real} | {ours_bytes[layer_idx]:,} | {stock_slots} | {stock_bytes[layer_idx]:,} |"
        )
    saved = 1 - sum(ours_bytes) / sum(stock_bytes)
    print(
        f"\nTotal: IVTP {mib(sum(ours_bytes))}, stock {mib(sum(stock_bytes))}: {saved:.1%} less "
        f"(this narrow model, batch {len(prompts)}, fp32). Logical length: {cache.get_seq_length()} tokens."
    )
    print(f"generate wall time: IVTP {ours_seconds:.2f} s, stock {stock_seconds:.2f} s (CPU, narrow widths).")

    preset = IvtpConfig.from_json_file(args.preset)
    plain = IvtpConfig.from_dict({**preset.to_dict(), "schedule": None})
    pruned_bytes, stock_7b = sum(kv_cache_bytes_per_layer(preset, 512)), sum(kv_cache_bytes_per_layer(plain, 512))
    print(
        f"\n{args.preset.name} at full width, prompt of {preset.num_patches} image + 512 text tokens, fp16, batch 1: "
        f"KV cache after prefill {pruned_bytes:,} B ({mib(pruned_bytes)}) vs stock {stock_7b:,} B ({mib(stock_7b)}): "
        f"{1 - pruned_bytes / stock_7b:.1%} less."
    )


if __name__ == "__main__":
    main()
