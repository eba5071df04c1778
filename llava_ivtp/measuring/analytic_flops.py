"""Analytic FLOPs of LLaVA-1.5 with and without an IVTP schedule (paper Table 9 convention).

Convention: 2 FLOPs per multiply-add; vision layers up to the feature layer (23 of 24 for LLaVA-1.5) plus the
patch embedding; every LLM layer with its token count; the LM head over all tokens. Attention scores count the
full `T x T` products (`QK^T` and `AV`). A tool for presets and reports.

These formulas leave out the multimodal projector and IVTP's own scoring. `llava-ivtp flops`
(`flops.py`) counts the real forward instead; `tests/test_flops.py` checks that the two agree for stock LLaVA
(same ViT; the LLM differs by the projector and the rotary tables only).
"""

from __future__ import annotations

from modeling_llava_ivtp.configuration_llava_ivtp import IvtpConfig


def vision_layer_flops(tokens: int, hidden: int, intermediate: int) -> int:
    projections = 4 * tokens * hidden * hidden
    mlp = 2 * tokens * hidden * intermediate
    scores = 2 * tokens * tokens * hidden
    return 2 * (projections + mlp + scores)


def llm_layer_flops(tokens: int, hidden: int, intermediate: int, kv_hidden: int) -> int:
    projections = 2 * tokens * hidden * hidden + 2 * tokens * hidden * kv_hidden
    mlp = 3 * tokens * hidden * intermediate
    scores = 2 * tokens * tokens * hidden
    return 2 * (projections + mlp + scores)


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def llm_visual_tokens_per_layer(config: IvtpConfig) -> list[int]:
    """Visual tokens of one image that each LLM layer sees (and caches) under the config's schedule."""
    schedule = config.schedule or {"vision": [], "llm": []}
    visual = schedule["vision"][-1] if schedule["vision"] else config.num_patches
    per_layer = []
    for kept in schedule["llm"]:
        per_layer += [visual] * config.group_size
        visual = kept
    return per_layer + [visual] * (config.text_config.num_hidden_layers - len(per_layer))


def kv_cache_bytes_per_layer(
    config: IvtpConfig, text_tokens: int, batch_size: int = 1, bytes_per_value: int = 2
) -> list[int]:
    """Bytes of keys and values each LLM layer holds after a prefill of one image and `text_tokens` text tokens."""
    text = config.text_config
    per_token = 2 * text.num_key_value_heads * _head_dim(text) * bytes_per_value
    return [batch_size * (visual + text_tokens) * per_token for visual in llm_visual_tokens_per_layer(config)]


def llava_flops(config: IvtpConfig, text_tokens: int) -> dict[str, float]:
    """FLOPs of one forward over one image and `text_tokens` text tokens: `{"vit", "llm", "total"}`."""
    vision, text = config.vision_config, config.text_config
    patches = config.num_patches
    groups = config.vision_layer_groups
    schedule = config.schedule or {"vision": [], "llm": []}
    vit = 2 * patches * vision.num_channels * vision.patch_size**2 * vision.hidden_size
    tokens = patches + 1
    counts = schedule["vision"] or [patches] * len(groups)
    for (first, last), kept in zip(groups, counts):
        vit += (last - first + 1) * vision_layer_flops(tokens, vision.hidden_size, vision.intermediate_size)
        tokens = kept + 1
    kv_hidden = text.num_key_value_heads * _head_dim(text)
    layer_counts = llm_visual_tokens_per_layer(config)
    llm = 0
    for visual_tokens in layer_counts:
        llm += llm_layer_flops(visual_tokens + text_tokens, text.hidden_size, text.intermediate_size, kv_hidden)
    llm += 2 * (layer_counts[-1] + text_tokens) * text.hidden_size * text.vocab_size
    return {"vit": vit, "llm": llm, "total": vit + llm}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Analytic TFLOPs of a preset against stock LLaVA (paper Table 3/9).")
    parser.add_argument("preset", help="path of an IvtpConfig JSON, e.g. configuration/llava-1.5-7b-ivtp.json")
    parser.add_argument("--text-tokens", type=int, nargs="+", default=[128, 256, 512, 1024])
    args = parser.parse_args(argv)
    ivtp = IvtpConfig.from_json_file(args.preset)
    stock = IvtpConfig.from_dict({**ivtp.to_dict(), "schedule": None})
    print("| text tokens | stock ViT | stock LLM | stock total | IVTP ViT | IVTP LLM | IVTP total | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for text_tokens in args.text_tokens:
        base, pruned = llava_flops(stock, text_tokens), llava_flops(ivtp, text_tokens)
        cells = [base["vit"], base["llm"], base["total"], pruned["vit"], pruned["llm"], pruned["total"]]
        row = " | ".join(f"{value / 1e12:.3f}" for value in cells)
        print(f"| {text_tokens} | {row} | {pruned['total'] / base['total']:.3f} |")


if __name__ == "__main__":
    main()
