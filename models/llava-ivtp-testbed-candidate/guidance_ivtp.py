"""Instruction guidance of IVTP (paper sec. 3.3, eq. 5-7): the frozen CLIP text tower and the LLM <-> CLIP alignment.

Model side: `build_clip_text_tower` (an open_clip `TextTransformer` from `IvtpConfig.clip_text_encoder`, architecture
only) and `clip_token_features` (every token's state after `ln_final` and the text projection, eq. 5).

Processor side (no model needed): `clip_tokens_with_spans` tokenizes text exactly as open_clip's `SimpleTokenizer`
does while keeping each CLIP token's character span in the *original* text, and `align_llm_to_clip` gives each LLM
token the range of CLIP tokens whose spans overlap its own (eq. 7 averages their relevance).
"""

from __future__ import annotations

import difflib
import html

import torch
from torch import nn


# Fields of `clip_text_encoder["text_cfg"]` the plain (OpenAI-style) open_clip text tower is built from.
CLIP_TEXT_CFG_FIELDS = ("context_length", "vocab_size", "width", "heads", "layers")
CLIP_TEXT_CFG_OPTIONAL = ("mlp_ratio",)


def clip_text_encoder_spec(model_name: str, quick_gelu: bool | None = None) -> dict:
    """`IvtpConfig.clip_text_encoder` for an open_clip architecture, read from open_clip's bundled configs.

    `quick_gelu` defaults to True for the OpenAI weights' architectures (LLaVA-1.5's ViT-L-14-336 is OpenAI CLIP).
    """
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"open_clip has no architecture {model_name!r}; see `open_clip.list_models()`.")
    text_cfg = {key: config["text_cfg"][key] for key in CLIP_TEXT_CFG_FIELDS}
    if "mlp_ratio" in config["text_cfg"]:
        text_cfg["mlp_ratio"] = config["text_cfg"]["mlp_ratio"]
    return {
        "model_name": model_name,
        "embed_dim": config["embed_dim"],
        "quick_gelu": bool(config.get("quick_gelu", True)) if quick_gelu is None else bool(quick_gelu),
        "text_cfg": text_cfg,
    }


def validate_clip_text_encoder(spec) -> None:
    """Raise a ValueError naming the field when `spec` cannot describe a plain open_clip text tower."""
    if not isinstance(spec, dict):
        raise ValueError(
            "`clip_text_encoder` must be None or a dict {'model_name', 'embed_dim', 'quick_gelu', 'text_cfg'}, got "
            f"{type(spec).__name__}."
        )
    expected = {"model_name", "embed_dim", "quick_gelu", "text_cfg"}
    if set(spec) != expected:
        raise ValueError(
            f"`clip_text_encoder` must have exactly the keys {sorted(expected)}; unknown: {sorted(set(spec) - expected)}, "
            f"missing: {sorted(expected - set(spec))}. `clip_text_encoder_spec('ViT-L-14-336')` builds one."
        )
    if not isinstance(spec["model_name"], str) or not spec["model_name"]:
        raise ValueError(f"`clip_text_encoder['model_name']` must be an open_clip architecture name, got {spec['model_name']!r}.")
    if isinstance(spec["embed_dim"], bool) or not isinstance(spec["embed_dim"], int) or spec["embed_dim"] < 1:
        raise ValueError(f"`clip_text_encoder['embed_dim']` must be a positive int, got {spec['embed_dim']!r}.")
    if not isinstance(spec["quick_gelu"], bool):
        raise ValueError(f"`clip_text_encoder['quick_gelu']` must be a bool, got {spec['quick_gelu']!r}.")
    text_cfg = spec["text_cfg"]
    if not isinstance(text_cfg, dict):
        raise ValueError(f"`clip_text_encoder['text_cfg']` must be a dict, got {type(text_cfg).__name__}.")
    unknown = sorted(set(text_cfg) - set(CLIP_TEXT_CFG_FIELDS) - set(CLIP_TEXT_CFG_OPTIONAL))
    missing = sorted(set(CLIP_TEXT_CFG_FIELDS) - set(text_cfg))
    if unknown or missing:
        raise ValueError(
            f"`clip_text_encoder['text_cfg']` takes {list(CLIP_TEXT_CFG_FIELDS)} (+ optional "
            f"{list(CLIP_TEXT_CFG_OPTIONAL)}) of a plain open_clip text tower; unknown: {unknown}, missing: {missing}."
        )
    for key in CLIP_TEXT_CFG_FIELDS:
        value = text_cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`clip_text_encoder['text_cfg']['{key}']` must be a positive int, got {value!r}.")
    if text_cfg["width"] % text_cfg["heads"]:
        raise ValueError(
            f"`clip_text_encoder['text_cfg']`: width {text_cfg['width']} must be divisible by heads {text_cfg['heads']}."
        )


def build_clip_text_tower(spec: dict) -> nn.Module:
    """The open_clip text tower (`TextTransformer`) of `spec`, architecture only: nothing is downloaded."""
    from open_clip.transformer import QuickGELU, TextTransformer

    text_cfg = spec["text_cfg"]
    return TextTransformer(
        context_length=text_cfg["context_length"],
        vocab_size=text_cfg["vocab_size"],
        width=text_cfg["width"],
        heads=text_cfg["heads"],
        layers=text_cfg["layers"],
        mlp_ratio=text_cfg.get("mlp_ratio", 4.0),
        output_dim=spec["embed_dim"],
        act_layer=QuickGELU if spec["quick_gelu"] else nn.GELU,
    )


def clip_token_features(tower: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Eq. 5: every token's final state after `ln_final` and the text projection, `(batch, context, embed_dim)`.

    Runs the tower's own submodules, each residual block as open_clip's `ResidualAttentionBlock.forward` does
    (`ln_1`, `attn`, `ls_1`, `ln_2`, `mlp`, `ls_2`), with the causal mask built here as a boolean (`True`: not
    attended) rather than read from the tower's non-persistent buffer, so it is right however the model was
    materialised (e.g. from the meta device). open_clip hands its blocks an additive float mask, which keeps
    `nn.MultiheadAttention` on its composite path (about 28 operators a layer); a boolean mask lets it take its fused
    kernel at inference (`torch._native_multi_head_attention`, one operator) and means the same where it cannot
    (training, gradients): the blocked keys get `-inf`. The fused kernel rounds differently (features agree to
    the float32 tolerance).
    """
    length = input_ids.shape[1]
    hidden = tower.token_embedding(input_ids) + tower.positional_embedding[:length].to(tower.token_embedding.weight.dtype)
    blocked = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
    for block in tower.transformer.resblocks:  # batch-first blocks (`build_clip_text_tower`)
        normed = block.ln_1(hidden)
        hidden = hidden + block.ls_1(block.attn(normed, normed, normed, need_weights=False, attn_mask=blocked)[0])
        hidden = hidden + block.ls_2(block.mlp(block.ln_2(hidden)))
    hidden = tower.ln_final(hidden)
    projection = tower.text_projection
    if isinstance(projection, nn.Module):
        return projection(hidden)
    return hidden @ projection


def clip_content_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Content tokens of CLIP sequences: after the start token, before the end token (the largest id, as
    open_clip's argmax pooling assumes), so start, end and padding are excluded (eq. 6)."""
    end = input_ids.argmax(dim=1, keepdim=True)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    return (positions > 0) & (positions < end)


# ----------------------------------------------------------------------------------------------------------------
# Processor side: character spans of CLIP tokens and their alignment with LLM tokens
# ----------------------------------------------------------------------------------------------------------------
def _origins_of_fixed_text(text: str, fixed: str) -> list[tuple[int, int]]:
    """For each character of `fixed` (text after ftfy/html fixes), the range of `text` it came from."""
    if fixed == text:
        return [(index, index + 1) for index in range(len(text))]
    origins: list[tuple[int, int]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, text, fixed, autojunk=False).get_opcodes():
        if tag == "equal":
            origins.extend((i1 + offset, i1 + offset + 1) for offset in range(i2 - i1))
        elif tag in ("replace", "insert"):
            origins.extend([(i1, max(i2, i1 + 1))] * (j2 - j1))
    return origins


def clean_with_origins(text: str, clean_fn) -> tuple[str, list[tuple[int, int]]]:
    """open_clip's "lower" cleaning (ftfy, html unescape, whitespace collapse, lower case) with, for each character
    of the cleaned text, the range of `text` it came from. The cleaned text is checked against `clean_fn(text)`."""
    import ftfy

    fixed = html.unescape(html.unescape(ftfy.fix_text(text)))
    fixed_origins = _origins_of_fixed_text(text, fixed)
    characters: list[str] = []
    origins: list[tuple[int, int]] = []
    pending_space = None
    for character, origin in zip(fixed, fixed_origins):
        if character.isspace():
            if characters:
                pending_space = origin
            continue
        if pending_space is not None:
            characters.append(" ")
            origins.append(pending_space)
            pending_space = None
        for lowered in character.lower():
            characters.append(lowered)
            origins.append(origin)
    mine = "".join(characters)
    expected = clean_fn(text)
    if expected == mine:
        return mine, origins
    if len(expected) == len(mine):  # context-dependent lower casing (final sigma): same characters, same places
        return expected, origins
    # Anything else: align what open_clip produced to our per-character cleaning.
    aligned: list[tuple[int, int]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, mine, expected, autojunk=False).get_opcodes():
        if tag == "equal":
            aligned.extend(origins[i1:i2])
        elif tag in ("replace", "insert"):
            source = origins[i1:i2] or origins[max(i1 - 1, 0) : i1]
            span = (min(s for s, _ in source), max(e for _, e in source)) if source else (0, 0)
            aligned.extend([span] * (j2 - j1))
    return expected, aligned


def clip_tokens_with_spans(clip_tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """CLIP content token ids of `text` (what `clip_tokenizer.encode(text)` returns) and each token's character span
    `[start, end)` in `text`.

    Uses the tokenizer's own cleaning, split pattern, byte encoder and BPE, so the ids are the tokenizer's; the
    spans follow each BPE piece back through its UTF-8 bytes and the cleaning to the original characters.
    """
    cleaned, origins = clean_with_origins(text, clip_tokenizer.clean_fn)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for match in clip_tokenizer.pat.finditer(cleaned):
        word = match.group()
        byte_to_char = [index for index, character in enumerate(word) for _ in character.encode("utf-8")]
        encoded = "".join(clip_tokenizer.byte_encoder[byte] for byte in word.encode("utf-8"))
        consumed = 0
        for piece in clip_tokenizer.bpe(encoded).split(" "):
            num_bytes = len(piece) - (len("</w>") if piece.endswith("</w>") else 0)
            first = byte_to_char[min(consumed, len(byte_to_char) - 1)]
            last = byte_to_char[min(consumed + max(num_bytes, 1), len(byte_to_char)) - 1]
            consumed += num_bytes
            covered = origins[match.start() + first : match.start() + last + 1]
            ids.append(clip_tokenizer.encoder[piece])
            spans.append((min(s for s, _ in covered), max(e for _, e in covered)))
    return ids, spans


def align_llm_to_clip(
    llm_spans: list[tuple[int, int]],
    clip_spans: list[tuple[int, int]],
    text: str,
    first_clip_position: int = 1,
    num_clip_positions: int | None = None,
) -> list[tuple[int, int]]:
    """Eq. 7's index sets: for each LLM token (character span in `text`), the range `[start, end)` of CLIP sequence
    positions whose tokens' spans share a non-whitespace character with it; `(0, 0)` when none.

    CLIP content token `k` sits at sequence position `first_clip_position + k` (after the start token); only the
    first `num_clip_positions` content tokens exist (the rest were cut by CLIP's context), so LLM tokens whose text
    lies past the cut get `(0, 0)`. Both tokenizations run left to right, so each range is contiguous.
    """
    if num_clip_positions is None:
        num_clip_positions = len(clip_spans)
    kept = clip_spans[:num_clip_positions]
    solid = [not character.isspace() for character in text]
    prefix = [0]
    for is_solid in solid:
        prefix.append(prefix[-1] + is_solid)

    def shares_a_character(a: tuple[int, int], b: tuple[int, int]) -> bool:
        start, end = max(a[0], b[0]), min(a[1], b[1])
        return end > start and prefix[end] - prefix[start] > 0

    ranges = []
    for llm_span in llm_spans:
        hits = [k for k, clip_span in enumerate(kept) if shares_a_character(llm_span, clip_span)]
        if hits:
            ranges.append((first_clip_position + hits[0], first_clip_position + hits[-1] + 1))
        else:
            ranges.append((0, 0))
    return ranges


__all__ = [
    "align_llm_to_clip",
    "build_clip_text_tower",
    "clean_with_origins",
    "clip_content_mask",
    "clip_text_encoder_spec",
    "clip_token_features",
    "clip_tokens_with_spans",
    "validate_clip_text_encoder",
]
