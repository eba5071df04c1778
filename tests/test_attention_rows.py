"""The recording attention backends (`attention_rows.py`) against stock eager attention's own probabilities.

A pruner's scores are rows of the attention a layer computed. Here a stock `LlamaAttention` / `CLIPAttention` runs
with `ivtp_sdpa` / `ivtp_eager` and a `RowRequest`; its answers are compared with the head-averaged weights stock
eager attention returns, cut by hand to the requested samples, rows and columns -- with padding, grouped-query heads,
rotary embeddings and a key range (`RowRequest.keys`).
"""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig
from transformers.models.clip.modeling_clip import CLIPAttention
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, apply_rotary_pos_emb

from modeling_llava_ivtp.attention_rows import RowRequest


BATCH, LENGTH = 3, 11


def _llama_pair(backend: str):
    """A stock eager LlamaAttention and a twin (same weights) running the recording backend `backend`."""
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         num_hidden_layers=1, vocab_size=10)
    torch.manual_seed(0)
    modules = []
    for implementation in ("eager", backend):
        layer_config = LlamaConfig(**config.to_dict())
        layer_config._attn_implementation = implementation
        modules.append(LlamaAttention(layer_config, layer_idx=0).eval())
    with torch.no_grad():
        for parameter in modules[0].parameters():
            parameter.normal_(0, 0.5)  # attention far from uniform, so a wrong row or key shows
    modules[1].load_state_dict(modules[0].state_dict())
    return config, modules


def _llama_inputs(config):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(BATCH, LENGTH, config.hidden_size, generator=generator)
    position_ids = torch.arange(LENGTH).expand(BATCH, -1)
    cos_sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    padding = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    padding[1, :3] = False  # sample 1 is left-padded
    allowed = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril() & padding[:, None, :]
    allowed |= torch.eye(LENGTH, dtype=torch.bool)  # padding rows see themselves (no empty softmax)
    return hidden, cos_sin, allowed.unsqueeze(1)


def _mask_for(backend: str, allowed: torch.Tensor) -> torch.Tensor:
    if backend.endswith("eager"):  # eager adds the mask to the logits
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return allowed


@pytest.mark.parametrize("backend", ["ivtp_sdpa", "ivtp_eager"])
def test_requested_rows_are_the_layers_attention_rows(backend):
    config, (stock, recording) = _llama_pair(backend)
    hidden, cos_sin, allowed = _llama_inputs(config)
    with torch.no_grad():
        expected_output, weights = stock(hidden, cos_sin, _mask_for("eager", allowed))
    reference = weights.mean(dim=1)  # (batch, queries, keys), head-averaged

    batch = torch.tensor([0, 1])
    rows = torch.tensor([[10, 4], [9, 10]])
    columns = torch.tensor([[2, 3, 4, 7], [3, 5, 6, 10]])
    request = RowRequest(batch=batch, rows=rows, columns=columns, value_columns=columns, key_columns=columns[:, :2])
    with torch.no_grad():
        output, _ = recording(hidden, cos_sin, _mask_for(backend, allowed), ivtp_rows=request)
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-5)  # the layer's output is untouched

    expected = torch.stack([reference[b][rows[i]][:, columns[i]] for i, b in enumerate(batch.tolist())])
    assert request.probabilities.dtype == torch.float32
    torch.testing.assert_close(request.probabilities, expected, rtol=1e-5, atol=1e-6)

    # Value norms over every head (IVTP eq. 4) and head-averaged keys after rotary (ToMe+'s metric), by hand.
    values = stock.v_proj(hidden).view(BATCH, LENGTH, -1, stock.head_dim)
    keys = stock.k_proj(hidden).view(BATCH, LENGTH, -1, stock.head_dim).transpose(1, 2)
    keys, _ = apply_rotary_pos_emb(keys, keys, *cos_sin)
    for i, b in enumerate(batch.tolist()):
        norms = torch.linalg.vector_norm(values[b, columns[i]], dim=(1, 2))
        torch.testing.assert_close(request.value_norms[i], norms.detach(), rtol=1e-5, atol=1e-6)
        key_means = keys[b][:, columns[i, :2]].mean(dim=0)
        torch.testing.assert_close(request.key_means[i], key_means.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["ivtp_sdpa", "ivtp_eager"])
def test_a_key_range_gives_the_same_rows(backend):
    """`keys` promises that the rows attend to nothing else: the softmax over those keys is the full one."""
    config, (stock, recording) = _llama_pair(backend)
    hidden, cos_sin, allowed = _llama_inputs(config)
    rows = torch.tensor([2, 5, 6])  # causal rows: they see slots 0..6 only
    keys = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])  # and one slot they cannot see (as the probe for real rows)
    columns = torch.tensor([[1, 4, 6, 9]] * BATCH)
    full, ranged = RowRequest(rows=rows, columns=columns), RowRequest(rows=rows, columns=columns, keys=keys)
    with torch.no_grad():
        recording(hidden, cos_sin, _mask_for(backend, allowed), ivtp_rows=full)
        recording(hidden, cos_sin, _mask_for(backend, allowed), ivtp_rows=ranged)
        _, weights = stock(hidden, cos_sin, _mask_for("eager", allowed))
    torch.testing.assert_close(ranged.probabilities, full.probabilities, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ranged.probabilities, weights.mean(dim=1)[:, rows][:, :, [1, 4, 6, 9]],
                               rtol=1e-5, atol=1e-6)
    assert bool((ranged.probabilities[..., -1] == 0).all())  # slot 9 lies in their future


@pytest.mark.parametrize("backend", ["ivtp_sdpa", "ivtp_eager"])
def test_every_row_request_scores_the_layers_own_probabilities(backend):
    """CLIP, every row asked (IVTP's rollout): the backend computes the layer itself and keeps its probabilities;
    its output is stock attention's."""
    config = CLIPVisionConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, image_size=24, patch_size=4)
    torch.manual_seed(0)
    modules = []
    for implementation in ("eager", backend):
        layer_config = CLIPVisionConfig(**config.to_dict())
        layer_config._attn_implementation = implementation
        modules.append(CLIPAttention(layer_config).eval())
    with torch.no_grad():
        for parameter in modules[0].parameters():
            parameter.normal_(0, 0.5)
    modules[1].load_state_dict(modules[0].state_dict())
    hidden = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(2))
    request = RowRequest()
    assert request.every_row
    with torch.no_grad():
        expected_output, weights = modules[0](hidden)
        output, _ = modules[1](hidden, ivtp_rows=request)
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(request.probabilities, weights.mean(dim=1), rtol=1e-5, atol=1e-6)
    cls_row = RowRequest(rows=torch.tensor([0]))  # one row: computed beside the stock call
    with torch.no_grad():
        modules[1](hidden, ivtp_rows=cls_row)
    torch.testing.assert_close(cls_row.probabilities, weights.mean(dim=1)[:, :1], rtol=1e-5, atol=1e-6)


def test_an_unanswered_request_says_why():
    config, (stock, _) = _llama_pair("ivtp_sdpa")
    hidden, cos_sin, allowed = _llama_inputs(config)
    request = RowRequest(rows=torch.tensor([0]))
    with torch.no_grad():
        stock(hidden, cos_sin, _mask_for("eager", allowed), ivtp_rows=request)  # stock eager ignores the kwarg
    with pytest.raises(RuntimeError, match="not a recording twin"):
        request.probabilities
