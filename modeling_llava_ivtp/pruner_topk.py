"""TopK baseline: keep the patches whose features are most similar to the CLS feature.

Source: the IVTP paper (Huang et al., "IVTP: Instruction-guided Visual Token Pruning for Large Vision-Language
Models"), sec. 4.1 "Comparison Details", Tables 1-3, 7, 9: "topK based on patch token similarity with the CLS token".
Rule: `score_i = cos(x_i, x_cls)` over the patch features `x_i` of one layer; keep the `k` highest scores.

Integration: a vision-layer site. Inputs are the layer's hidden states split into the CLS feature (index 0, kept apart
by the caller) and the patch features; no attention rows are needed. The paper's Table 9 gives TopK a ViT cost of
0.190 vs 0.361 TFLOPs, so it pruned inside the ViT, not only at LLaVA's feature layer (`vision_feature_layer=-2`);
the function is layer-agnostic. TopK+ (Table 7) reapplies the same rule in the LLM.
"""

from __future__ import annotations

import torch

from .pruning_ivtp import cosine_relevance, select_keep_indices


def topk_cls_similarity(patch_features: torch.Tensor, cls_feature: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch feature with its image's CLS feature, in float32.

    Args:
        patch_features: `(batch, n, dim)`, the patch tokens (CLS excluded).
        cls_feature: `(batch, dim)`, the CLS token of the same layer.

    Returns:
        `(batch, n)` float32 scores in `[-1, 1]`.
    """
    if patch_features.dim() != 3:
        raise ValueError(f"patch_features must be (batch, n, dim), got shape {tuple(patch_features.shape)}.")
    expected = (patch_features.shape[0], patch_features.shape[2])
    if tuple(cls_feature.shape) != expected:
        raise ValueError(f"cls_feature must be (batch, dim) = {expected}, got shape {tuple(cls_feature.shape)}.")
    return cosine_relevance(patch_features, cls_feature)


def topk_keep_indices(patch_features: torch.Tensor, cls_feature: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices of the `num_keep` patches most similar to the CLS feature, sorted ascending.

    Args:
        patch_features: `(batch, n, dim)`.
        cls_feature: `(batch, dim)`.
        num_keep: `1 <= num_keep <= n`.

    Returns:
        `(batch, num_keep)` int64, sorted, unique, in `[0, n)`; equal scores go to the lower index.
    """
    return select_keep_indices(topk_cls_similarity(patch_features, cls_feature), num_keep)
