"""The output of LLaVA-IVTP's forward: Llava's, plus where each row of `logits` came from and what was pruned."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast


@dataclass
class IvtpCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    kept_positions (`torch.LongTensor` of shape `(batch_size, kept_len)`, *optional*):
        For each row of `logits`, its index in `input_ids`; -1 marks a padding slot (a sample of a batch that kept
        fewer tokens than the others). With pruning off this is `arange(sequence_length)`.
    vision_keep_indices (`torch.LongTensor` of shape `(num_images, k_final)`, *optional*):
        Indices (0..num_patches-1, row-major in the patch grid) of the patches stage 1 kept, in increasing order.
        VisionZip (its default layout): the patch each token stands for, in the order the tokens enter the LLM, -1
        for its CLS token.
    llm_keep_indices (`tuple(torch.LongTensor)`, *optional*):
        One entry per stage-2 group: `(batch_size, m_g)` patch indices (0..num_patches-1) of the visual tokens
        kept after that group, for samples with an image (-1 rows for samples without one).
    vision_token_counts (`tuple(int)`, *optional*):
        Patch tokens (CLS not counted) that stage 1 kept after each vision group, read off the pruned tensors.
    llm_token_counts (`tuple(int)`, *optional*):
        Visual tokens per image that stage 2 kept after each LLM group, read off the pruned tensors.
    visual_tokens_per_layer (`tuple(int)`, *optional*):
        Visual tokens per image that each LLM layer held (from the token state's host sizes; 0 where no sample of
        the batch has an image).
    instruction_relevance (`torch.FloatTensor` of shape `(batch_size, sequence_length)`, *optional*):
        Relevance of each `input_ids` token to its image under the guidance mode (eq. 7 for `"clip_relevance"`, the
        embedding cosine for `"embedding_relevance"`); NaN where a token has none (not instruction, no CLIP token).
    pseudo_cls_tokens (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
        The `input_ids` tokens averaged into each sample's pseudo-CLS (eq. 8); all False where the visual CLS was used.
    """

    kept_positions: torch.LongTensor | None = None
    vision_keep_indices: torch.LongTensor | None = None
    llm_keep_indices: tuple[torch.LongTensor, ...] | None = None
    vision_token_counts: tuple[int, ...] | None = None
    llm_token_counts: tuple[int, ...] | None = None
    visual_tokens_per_layer: tuple[int, ...] | None = None
    instruction_relevance: torch.FloatTensor | None = None
    pseudo_cls_tokens: torch.BoolTensor | None = None


__all__ = ["IvtpCausalLMOutputWithPast"]
