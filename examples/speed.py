"""Speed: a small LLaVA-IVTP built offline, run on a generated image, against stock Llava with the same weights.

The model has LLaVA-1.5-7B's token geometry and depth (336 px images, 14 px patches, 24 vision layers, 32 LLM
layers) and the 7B preset's schedule, with narrow layers and random weights so it runs on a CPU in seconds.
Nothing is downloaded.

    python examples/speed.py [--preset configuration/llava-1.5-7b-ivtp.json] [--text-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

from modeling_llava_ivtp import IvtpConfig, LlavaIvtpForConditionalGeneration


ROOT = Path(__file__).resolve().parent.parent


def small_config(preset_path: Path, **overrides) -> IvtpConfig:
    """The preset's geometry and schedule with narrow widths (and `overrides` of IvtpConfig fields)."""
    preset = json.loads(preset_path.read_text())
    preset["vision_config"].update(hidden_size=128, intermediate_size=512, num_attention_heads=4, projection_dim=64)
    preset["text_config"].update(
        hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=8, vocab_size=32064
    )
    preset.update(overrides)
    return IvtpConfig(**preset)


def demo_tokenizer(corpus: list[str], image_token_id: int = 32000):
    """A Llama-style tokenizer (Metaspace + BPE, BOS added) trained here on `corpus`, offline, so the words of the
    demo are whole tokens; `<image>` gets LLaVA-1.5's id. Stands in for LLaVA's tokenizer, which cannot be fetched."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
            pre_tokenizers.Punctuation(),
        ]
    )
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:'-\n\u2581")
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizer
    trained.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"], **{"<image>": image_token_id})
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in state["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        additional_special_tokens=["<image>"], padding_side="left",
    )


def model_and_stock(preset_path: Path) -> tuple[LlavaIvtpForConditionalGeneration, LlavaForConditionalGeneration]:
    """The small IVTP model of `preset_path` (random weights, sdpa) and a stock Llava holding the same weights."""
    config = small_config(preset_path)
    config._attn_implementation = "sdpa"
    model = LlavaIvtpForConditionalGeneration(config).eval()
    ivtp_fields = ("schedule", "group_size", "tau", "clip_text_encoder", "guidance", "model_type")
    stock_config = LlavaConfig(**{k: v for k, v in config.to_dict().items() if k not in ivtp_fields})
    stock_config._attn_implementation = "sdpa"
    stock = LlavaForConditionalGeneration(stock_config).eval()
    stock.load_state_dict(model.state_dict())
    return model, stock


def generated_image(size: int = 336) -> Image.Image:
    """A picture with structure: a bright disc on a gradient, so patches differ."""
    yy, xx = np.mgrid[0:size, 0:size]
    red = (xx / size * 255).astype(np.uint8)
    green = (yy / size * 255).astype(np.uint8)
    disc = ((xx - size * 0.3) ** 2 + (yy - size * 0.6) ** 2) < (size * 0.15) ** 2
    blue = np.where(disc, 255, 40).astype(np.uint8)
    return Image.fromarray(np.stack([red, green, blue], axis=-1))


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, default=ROOT / "configuration" / "llava-1.5-7b-ivtp.json")
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens in the prompt besides the image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, stock = model_and_stock(args.preset)
    config = model.config

    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixel_values = processor(images=generated_image(), return_tensors="pt")["pixel_values"]
    prefix = torch.randint(3, 32000, (args.text_tokens // 4,)).tolist()
    suffix = torch.randint(3, 32000, (args.text_tokens - len(prefix),)).tolist()
    input_ids = torch.tensor([[1] + prefix + [config.image_token_id] * config.num_patches + suffix])

    with torch.inference_mode():
        out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False)
        reference = stock(input_ids=input_ids, pixel_values=pixel_values, use_cache=False)
    print(f"prompt: {input_ids.shape[1]} tokens ({config.num_patches} image placeholders + {args.text_tokens + 1} text)")
    print("stage 1, vision tower: patches kept after each group of", config.group_size, "layers")
    for (first, last), count in zip(config.vision_layer_groups, out.vision_token_counts):
        print(f"  layers {first:2d}-{last:2d}: {count}")
    print("stage 2, LLM: visual tokens kept after each group")
    for (first, last), count in zip(config.llm_layer_groups, out.llm_token_counts):
        print(f"  layers {first:2d}-{last:2d}: {count}")
    print(f"logits rows: IVTP {out.logits.shape[1]}, stock {reference.logits.shape[1]}")
    kept = out.vision_keep_indices[0]
    grid = torch.zeros(config.num_patches, dtype=torch.long)
    grid[out.llm_keep_indices[-1][0]] = 1
    side = int(config.num_patches**0.5)
    print(f"the {len(out.llm_keep_indices[-1][0])} visual tokens that reach the LLM's last layers ({len(kept)} left the vision tower):")
    for row in grid.view(side, side).tolist():
        print("  " + "".join("#" if cell else "." for cell in row))

    def run_ivtp():
        with torch.inference_mode():
            model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False)

    def run_stock():
        with torch.inference_mode():
            stock(input_ids=input_ids, pixel_values=pixel_values, use_cache=False)

    ivtp_seconds = median_seconds(run_ivtp, args.repeats)
    stock_seconds = median_seconds(run_stock, args.repeats)
    print(
        f"forward time (median of {args.repeats}, {torch.get_num_threads()} threads): stock Llava {stock_seconds * 1000:.1f} ms, "
        f"LLaVA-IVTP {ivtp_seconds * 1000:.1f} ms, speed-up {stock_seconds / ivtp_seconds:.2f}x"
    )


if __name__ == "__main__":
    main()
