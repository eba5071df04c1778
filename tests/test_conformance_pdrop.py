"""PyramidDrop as its authors' code runs it (`Cooperx521/PyramidDrop`, `llava/model/modeling_llama_pdrop.py`):
`pdrop_forward` runs the decoder layers; after layer `l` with `l + 1` in `layer_list` it calls `pdrop_rank_drop`
with `rank_layer = l + 1`, which applies that layer's `input_layernorm` and q/k projections (rotary at the current
position ids) to layer `l`'s output, takes the query row of the prompt's last token (`prompt_total_len - 1` at
inference), softmaxes over every key under the causal mask, averages over heads, slices the image keys, keeps the
top `keep_length` in their order, rebuilds the sequence and renumbers the positions `0..cur_len-1`.

The reference below follows that reading on one unpadded sample at a time with the model's own (stock Llama)
layers; the model's kept tokens and logits must equal it, in a padded batch too.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from modeling_llava_ivtp.pruner_pdrop import schedule_for_budget
from tiny_models import IMAGE_TOKEN_ID, make_batch, sharpen_attention, tiny_model


BUDGET = 8


def official_pdrop(model, input_ids: torch.Tensor, image_features: torch.Tensor, scoring_offset: int = 1):
    """One sample: the logits of every token the last layer holds and the image tokens kept at each stage (indices
    into the image's placeholders). `scoring_offset=0` ranks with the pruning layer itself instead (not the code's
    rule: to show the check tells them apart)."""
    language_model = model.model.language_model
    config = model.config.text_config
    schedule = schedule_for_budget(36, config.num_hidden_layers, BUDGET)
    layer_list = list(schedule.layers)  # the `rank_layer`s
    hidden = model.get_input_embeddings()(input_ids)[None]
    image = torch.where(input_ids == IMAGE_TOKEN_ID)[0]
    hidden[0, image] = image_features
    patch = torch.full((len(input_ids),), -1)
    patch[image] = torch.arange(len(image))
    kept_per_stage = []
    for layer_idx, layer in enumerate(language_model.layers):
        length = hidden.shape[1]
        position_ids = torch.arange(length)[None]  # renumbered after every drop
        rotary = language_model.rotary_emb(hidden, position_ids)
        hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rotary)
        rank_layer = layer_idx + 1
        if rank_layer not in layer_list:
            continue
        keep_length = schedule.num_keep[layer_list.index(rank_layer)]
        scorer = language_model.layers[layer_idx + scoring_offset]
        normed = scorer.input_layernorm(hidden)
        heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads
        query = scorer.self_attn.q_proj(normed).view(1, length, heads, head_dim).transpose(1, 2)
        key = scorer.self_attn.k_proj(normed).view(1, length, kv_heads, head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *rotary)
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        last = length - 1  # the prompt's last token
        logits = (query[0, :, last : last + 1] @ key[0].transpose(-1, -2)) * head_dim**-0.5  # (heads, 1, length)
        attention = logits.softmax(dim=-1).mean(dim=0)[0]  # the last row sees every key under the causal mask
        visual = torch.where(patch >= 0)[0]
        top = attention[visual].topk(keep_length).indices.sort().values
        kept_per_stage.append(patch[visual[top]])
        keep = patch < 0
        keep[visual[top]] = True
        hidden, patch = hidden[:, keep], patch[keep]
    logits = model.lm_head(language_model.norm(hidden))[0]
    return logits, kept_per_stage


@pytest.mark.parametrize("batch_lengths", [((3, 6),), ((2, 5), (4, 9))], ids=["alone", "padded-batch"])
def test_pdrop_prunes_and_renumbers_as_the_released_code(batch_lengths):
    model = sharpen_attention(tiny_model(schedule=None, pruning_method="pdrop",
                                         pruning_options={"visual_tokens": BUDGET}))
    batch = make_batch(batch_lengths)
    position_ids = (batch["attention_mask"].cumsum(dim=1) - 1).clamp_min(0)  # as `generate` gives them
    with torch.no_grad():
        out = model(**batch, position_ids=position_ids, use_cache=False)
        features = model.model.multi_modal_projector(
            model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        )
        for row in range(len(batch_lengths)):
            real = batch["attention_mask"][row].bool()
            logits, kept = official_pdrop(model, batch["input_ids"][row][real], features[row])
            for stage, expected in enumerate(kept):
                assert out.llm_keep_indices[stage][row].tolist() == expected.tolist(), (row, stage)
            rows = out.kept_positions[row] >= 0
            rows &= batch["attention_mask"][row].gather(0, out.kept_positions[row].clamp_min(0)).bool()
            torch.testing.assert_close(out.logits[row][rows], logits, atol=2e-5, rtol=1e-5)


def test_pdrop_ranks_with_the_next_layer_not_its_own():
    """The scoring layer matters on this model: ranking with the pruning layer's own attention keeps other tokens,
    so the check above would see a model that scored with the wrong layer."""
    model = sharpen_attention(tiny_model(schedule=None, pruning_method="pdrop",
                                         pruning_options={"visual_tokens": BUDGET}))
    batch = make_batch(((3, 6),))
    with torch.no_grad():
        kept = model(**batch, use_cache=False).llm_keep_indices
        features = model.model.multi_modal_projector(
            model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        )
        _, own_layer = official_pdrop(model, batch["input_ids"][0], features[0], scoring_offset=0)
    assert any(kept[stage][0].tolist() != own.tolist() for stage, own in enumerate(own_layer))
