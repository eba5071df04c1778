"""Model cards for IVTP checkpoints: a Jinja template per host (`llava_ivtp.md.j2` for LLaVA-1.5,
`llava_next_ivtp.md.j2` for LLaVA-NeXT) rendered with `huggingface_hub.ModelCard`.

`render_model_card(config, ...)` fills the YAML metadata (`ModelCardData`), the schedule table from the config, the
paper's figures (labelled as the paper's) and a usage snippet pinned to a revision. `llava-ivtp convert` writes it as
the checkpoint's README.md.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).with_name("llava_ivtp.md.j2")
NEXT_TEMPLATE_PATH = Path(__file__).with_name("llava_next_ivtp.md.j2")
TAGS = ["llava", "ivtp", "token-pruning", "image-text-to-text", "custom_code"]
UNPINNED = "main"


def schedule_rows(config) -> list[dict]:
    """One row per pruning group: stage, layers (0-based, inclusive) and visual tokens kept after it (LLaVA-NeXT:
    per crop in the vision tower, per image in the LLM)."""
    schedule = config.schedule or {"vision": [], "llm": []}
    crops = config.max_crops > 1
    rows = [
        {"stage": f"1: vision tower (attention rollout{', each crop' if crops else ''})", "layers": f"{first}-{last}",
         "kept": kept}
        for (first, last), kept in zip(config.vision_layer_groups, schedule["vision"])
    ]
    rows += [
        {"stage": f"2: LLM (instruction-guided{', each image' if crops else ''})", "layers": f"{first}-{last}",
         "kept": kept}
        for (first, last), kept in zip(config.llm_layer_groups, schedule["llm"])
    ]
    return rows


def computed_flops(config, text_tokens: int = 512) -> dict | None:
    """TFLOPs of this config against its stock twin (analytic count), formatted for the card."""
    from llava_ivtp.measuring.analytic_flops import llava_flops
    from modeling_llava_ivtp import IvtpConfig

    if not config.schedule or config.max_crops > 1:  # the analytic count is LLaVA-1.5's (NeXT: `llava-ivtp flops`)
        return None
    stock = IvtpConfig.from_dict({**config.to_dict(), "schedule": None})
    pruned, base = llava_flops(config, text_tokens)["total"], llava_flops(stock, text_tokens)["total"]
    return {
        "text_tokens": text_tokens, "ivtp": f"{pruned / 1e12:.3f}", "stock": f"{base / 1e12:.3f}",
        "ratio": f"{pruned / base:.1%}",
    }


def render_model_card(
    config,
    *,
    base_model: str,
    license: str,
    clip_source: str,
    repo_id: str | None = None,
    revision: str | None = None,
    command: str = "llava-ivtp convert ...",
) -> ModelCard:
    """The model card of an IVTP checkpoint made from `base_model` (a hub repo id) and the open_clip `clip_source`.

    `revision` pins the usage snippet (a commit hash); without one the snippet says `"main"`, to be pinned once the
    repository exists (`llava-ivtp convert --push-to-hub` does that with the commit it made).
    """
    from modeling_llava_ivtp import SUPPORTED_TRANSFORMERS, __version__

    for name, value in (("base_model", base_model), ("license", license), ("clip_source", clip_source)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"render_model_card: `{name}` must be a non-empty string, got {value!r}.")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        license=license,
        tags=list(TAGS),
    )
    name = (repo_id or f"{base_model.split('/')[-1]}-ivtp").split("/")[-1]
    return ModelCard.from_template(
        card_data,
        template_path=str(NEXT_TEMPLATE_PATH if config.max_crops > 1 else TEMPLATE_PATH),
        max_visual_tokens=config.max_visual_tokens,
        title=name,
        base_model=base_model,
        license=license,
        clip_source=clip_source,
        repo_id=repo_id or f"<your-namespace>/{name}",
        revision=revision or UNPINNED,
        package_version=__version__,
        supported_transformers=",".join(SUPPORTED_TRANSFORMERS),
        group_size=config.group_size,
        tau=config.tau,
        guidance=config.guidance,
        num_patches=config.num_patches,
        schedule_rows=schedule_rows(config),
        computed_flops=computed_flops(config),
        command=command,
    )
