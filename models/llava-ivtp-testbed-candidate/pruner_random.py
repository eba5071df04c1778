"""Random baseline: keep a uniformly random subset of the patches.

Source: the IVTP paper (Huang et al., ECCV 2024), Tables 1-2 ("Random"). Site: the projected image features, before
the LLM (which tokens are dropped does not depend on any layer). The subset is drawn from a generator seeded by
`pruning_options["seed"]`, once per forward and shared by every image: a uniformly random subset of grid positions
that does not depend on the image or on the batch it is in, so a sample gives the same output alone and in a batch,
and every decoding path agrees. Over the seeds it is the uniform random baseline; for one seed, the same positions.
"""

from __future__ import annotations

import torch

from .pruner_base import ProjectedPruner, register_pruner


@register_pruner
class RandomPruner(ProjectedPruner):
    name = "random"
    options = {"visual_tokens": 64, "seed": 0}
    variable_lengths = True  # LLaVA-NeXT: the same random order over each image's packed tokens (a prefix of it)

    @classmethod
    def check_options(cls, config, values):
        super().check_options(config, values)
        seed = values["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`pruning_options['seed']` of pruning_method='random' must be an int >= 0, got {seed!r}.")

    def score(self, features):
        generator = torch.Generator().manual_seed(self.values["seed"])
        scores = torch.rand(features.shape[1], generator=generator)  # one uniform random order of the patch grid
        return scores.to(features.device).expand(features.shape[0], -1)
