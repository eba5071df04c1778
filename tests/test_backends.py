"""Pruning with attention backends other than sdpa and eager: the layer's output comes from the user's kernel, the
rows a pruner scores come from its q/k and the mask it got, in whatever form (`attention_rows.py`).

Three backends registered here through transformers' `AttentionInterface`, as a user registers one:
- `"test_sdpa_kernel"`: sdpa's function under another name, with sdpa's mask function: every method's outputs must
  be *bit-identical* to sdpa's (the twin adds nothing to the kernel);
- `"test_padding_mask_kernel"`: a kernel with flash attention's mask form (`flash_attention_mask`: a 2-D padding mask
  or none; causal by itself, bottom-right aligned; query rows without a key give zeros): the probe's rule cannot be
  said, so the twin recomputes the probe's row. Every method keeps the tokens sdpa keeps and gives its logits to
  float tolerance; cache and no cache agree;
- `"test_maskless_kernel"`: registered without a mask function (its layers get no mask): a pruned prefill runs at
  batch size 1 and a padded batch is refused by name.
And transformers' `"flex_attention"` (a `BlockMask`; compiled by torch on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

from modeling_llava_ivtp.pruners import PRUNERS
from tiny_models import IMAGE_TOKEN_ID, TINY_CLIP_TEXT, make_batch, sharpen_attention, tiny_model


def padding_mask_kernel(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Flash attention's semantics in plain torch: `attention_mask` a 2-D `(batch, keys)` padding mask or `None`;
    causal where the module is (bottom-right aligned when there are fewer queries than keys)."""
    if key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    assert attention_mask is None or attention_mask.ndim == 2, "this kernel takes padding masks only"
    num_queries, num_keys = query.shape[2], key.shape[2]
    allowed = torch.ones(query.shape[0], 1, num_queries, num_keys, dtype=torch.bool, device=query.device)
    if getattr(module, "is_causal", False):
        allowed = allowed & torch.ones(num_queries, num_keys, dtype=torch.bool).tril(num_keys - num_queries)
    if attention_mask is not None:  # padded keys masked; padded query rows give zeros, as flash's unpadding
        allowed = allowed & attention_mask[:, None, None, -num_keys:].bool()
        allowed = allowed & attention_mask[:, None, -num_queries:, None].bool()
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    probabilities = logits.softmax(dim=-1) * allowed.any(dim=-1, keepdim=True)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_sdpa_kernel", sdpa_attention_forward)
AttentionMaskInterface.register("test_sdpa_kernel", sdpa_mask)
AttentionInterface.register("test_padding_mask_kernel", padding_mask_kernel)
AttentionMaskInterface.register("test_padding_mask_kernel", flash_attention_mask)
AttentionInterface.register("test_maskless_kernel", sdpa_attention_forward)

BATCH = ((2, 5), (4, 9), (1, 3))


def method_model(method: str, attn_implementation: str):
    extra = {"clip_text_encoder": TINY_CLIP_TEXT} if method == "cdpruner" else {}
    if method == "ivtp":
        model = tiny_model(attn_implementation=attn_implementation)
    else:
        model = tiny_model(schedule=None, pruning_method=method, pruning_options={"visual_tokens": 8},
                           attn_implementation=attn_implementation, **extra)
    return sharpen_attention(model)


def outputs(model, batch, use_cache=False):
    with torch.no_grad():
        out = model(**batch, use_cache=use_cache)
        tokens = model.generate(**batch, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID],
                                pad_token_id=0)
    return out, tokens


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_a_registered_sdpa_kernel_gives_sdpa_bit_for_bit(method):
    batch = make_batch(BATCH)
    reference, reference_tokens = outputs(method_model(method, "sdpa"), batch)
    model = method_model(method, "test_sdpa_kernel")
    assert model.config.text_config._attn_implementation == "ivtp_test_sdpa_kernel"  # its recording twin
    out, tokens = outputs(model, batch)
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.kept_positions, reference.kept_positions)
    assert torch.equal(tokens, reference_tokens)


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_a_padding_mask_kernel_keeps_what_sdpa_keeps(method):
    batch = make_batch(BATCH)
    reference, reference_tokens = outputs(method_model(method, "sdpa"), batch)
    model = method_model(method, "test_padding_mask_kernel")
    out, tokens = outputs(model, batch)
    assert torch.equal(out.kept_positions, reference.kept_positions)
    for name in ("vision_keep_indices", "llm_keep_indices"):
        expected, got = getattr(reference, name), getattr(out, name)
        assert (expected is None) == (got is None)
        if expected is not None:
            assert all(torch.equal(a, b) for a, b in zip(expected, got)) if isinstance(expected, tuple) else \
                torch.equal(expected, got)
    real = (out.kept_positions >= 0) & batch["attention_mask"].bool().gather(1, out.kept_positions.clamp_min(0))
    torch.testing.assert_close(out.logits[real], reference.logits[real], atol=2e-5, rtol=1e-4)
    assert torch.equal(tokens, reference_tokens)
    # steps over the pruned cache: the cached forward's last logits equal the uncached one's
    cached, _ = outputs(model, batch, use_cache=True)
    torch.testing.assert_close(cached.logits[:, -1], out.logits[:, -1], atol=1e-6, rtol=1e-6)


def test_the_probe_row_is_recomputed_where_the_mask_cannot_say_its_rule():
    """The probe (IVTP's pseudo-CLS, the last row) attends to the keys up to its image and to itself; a padding mask
    cannot say so. The twin of a padding-mask kernel gives the row that sdpa gives with the rule in a 4-D mask (and
    the kernel alone gives another); the other rows are the kernel's."""
    from modeling_llava_ivtp.attention_rows import recording_backend
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    generator = torch.Generator().manual_seed(0)
    batch, heads, slots, dim = 2, 4, 9, 8
    query, key, value = (torch.randn(batch, heads, slots, dim, generator=generator) * 3 for _ in range(3))
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    padding = torch.ones(batch, slots, dtype=torch.bool)
    padding[1, :2] = False  # the second sample is left-padded
    probe_end = torch.tensor([4, 6])  # each sample's last key the probe may see, besides itself
    keys = torch.arange(slots)
    allowed = torch.ones(slots, slots, dtype=torch.bool).tril().expand(batch, -1, -1).clone()
    allowed[:, -1] = (keys <= probe_end[:, None]) | (keys == slots - 1)
    allowed &= padding[:, None, :]
    allowed[1, :2] = False
    allowed[1, :2, 0] = True  # padded query rows: any key (their output is not compared)
    expected, _ = sdpa_attention_forward(module, query, key, value, allowed[:, None], scaling=dim**-0.5)
    twin = ALL_ATTENTION_FUNCTIONS[recording_backend("test_padding_mask_kernel")]
    got, _ = twin(module, query, key, value, padding, scaling=dim**-0.5, ivtp_probe=probe_end)
    kernel, _ = padding_mask_kernel(module, query, key, value, padding, scaling=dim**-0.5)
    torch.testing.assert_close(got[:, -1], expected[:, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kernel[:, -1], expected[:, -1], atol=1e-3)  # the kernel alone: the probe sees all
    assert torch.equal(got[:, :-1], kernel[:, :-1])
    torch.testing.assert_close(got[0, :-1], expected[0, :-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 2:-1], expected[1, 2:-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ivtp", "fastv", "tome", "divprune"])
def test_a_kernel_without_masks_runs_one_sample_and_refuses_a_padded_batch(method):
    single = make_batch(((3, 4),))
    reference, reference_tokens = outputs(method_model(method, "sdpa"), single)
    model = method_model(method, "test_maskless_kernel")
    out, tokens = outputs(model, single)
    assert torch.equal(out.kept_positions, reference.kept_positions)
    torch.testing.assert_close(out.logits, reference.logits, atol=2e-5, rtol=1e-4)
    assert torch.equal(tokens, reference_tokens)
    with pytest.raises(ValueError, match="'test_maskless_kernel' has no mask function"):
        outputs(model, make_batch(BATCH))  # left padding (and, in the LLM, padding slots) needs a mask


def test_the_config_keeps_the_users_backend_name(tmp_path):
    import json

    model = method_model("fastv", "test_sdpa_kernel")
    assert model.config._attn_implementation == "ivtp_test_sdpa_kernel"
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "ivtp_" not in json.dumps(saved)
    model.config.pruning_method = None
    with torch.no_grad():
        model(**make_batch(((2, 5),)))
    assert model.config._attn_implementation == "test_sdpa_kernel"  # pruning off: the backend itself


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_flex_attention_prefill_keeps_what_sdpa_keeps(method):
    """transformers' own flex attention (compiled by torch; a `BlockMask` per run, the probe's row recomputed) on one
    sample. torch 2.14's CPU compiler fails on some shapes whatever the model (a stock Llava decode step with flex
    attention stops with a C++ compile error on this machine), so the check is a prefill of one sample."""
    batch = make_batch(((3, 4),))
    reference = method_model(method, "sdpa")
    model = method_model(method, "flex_attention")
    with torch.no_grad():
        expected, got = reference(**batch, use_cache=False), model(**batch, use_cache=False)
    assert torch.equal(got.kept_positions, expected.kept_positions)
    torch.testing.assert_close(got.logits, expected.logits, atol=2e-5, rtol=1e-4)
