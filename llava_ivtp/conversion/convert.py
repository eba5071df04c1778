"""`llava-ivtp convert`: a stock llava-hf checkpoint + the open_clip CLIP of its vision tower -> an IVTP checkpoint.

    llava-ivtp convert --llava llava-hf/llava-1.5-7b-hf --clip ViT-L-14-336:openai \
        --preset configuration/llava-1.5-7b-ivtp.json --out llava-1.5-7b-ivtp [--push-to-hub me/llava-1.5-7b-ivtp]
    llava-ivtp convert --llava llava-hf/llava-v1.6-vicuna-7b-hf --clip ViT-L-14-336:openai \
        --preset configuration/llava-v1.6-vicuna-7b-ivtp.json --out llava-v1.6-vicuna-7b-ivtp

A LLaVA-1.5 checkpoint (model_type "llava") becomes a `LlavaIvtpForConditionalGeneration`, a LLaVA-NeXT one
("llava_next") a `LlavaNextIvtpForConditionalGeneration`, each with its preset kind ("llava_ivtp" / "llava_next_ivtp").

The LLaVA weights are loaded unchanged (every tensor, checked), the preset gives the pruning schedule, and the CLIP
checkpoint gives the text tower and visual projection that instruction guidance needs (paper eq. 5-6). The output
folder is a self-contained `trust_remote_code` checkpoint: config with `auto_map`, safetensors, the processor with
the LLaVA-1.5 chat template, the model package's Python files and a model card (README.md). Mismatched inputs are
refused: a CLIP whose vision embeddings differ from the LLaVA vision tower's, a preset whose shapes differ from the
checkpoint's, missing files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError


OPEN_CLIP_SCHEMAS = ("local-dir:", "hf-hub:")
LLAVA_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Fields that must agree between the preset and the llava checkpoint (the preset was made for that architecture).
PRESET_FIELDS = {
    "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"),
    "text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"),
    None: ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy"),
}
NEXT_PRESET_FIELDS = ("image_grid_pinpoints",)  # LLaVA-NeXT's too: the grid decides the crops and the schedule bound
PRESET_IVTP_FIELDS = ("group_size", "schedule", "tau", "guidance")  # IVTP_FIELDS but the CLIP, given by --clip
# The stock checkpoint's model_type -> the preset's model_type and the host's name.
HOSTS = {"llava": ("llava_ivtp", "LLaVA-1.5"), "llava_next": ("llava_next_ivtp", "LLaVA-NeXT")}
# HF CLIP vision embeddings <-> open_clip `visual` parameters that show two vision towers are the same CLIP.
VISION_EMBEDDINGS = (
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.patch_embedding.weight", "conv1.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("pre_layrnorm.weight", "ln_pre.weight"),
    ("pre_layrnorm.bias", "ln_pre.bias"),
    ("post_layernorm.weight", "ln_post.weight"),
    ("post_layernorm.bias", "ln_post.bias"),
)
DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ConversionError(ValueError):
    """Inputs that cannot make a correct IVTP checkpoint; the message names the argument and what is wrong."""


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def parse_clip_source(source: str) -> tuple[str, str | None]:
    """`--clip` -> (model name for `open_clip.create_model`, `pretrained` tag or file, or None for schemas).

    Accepted: `ARCH:TAG` (a built-in architecture and one of its pretrained tags, e.g. `ViT-L-14-336:openai`),
    `ARCH:FILE` (a built-in architecture and a local checkpoint file), `local-dir:DIR` or `hf-hub:REPO`
    (open_clip's own format: `open_clip_config.json` + weights).
    """
    import open_clip

    if not isinstance(source, str) or not source:
        raise ConversionError("--clip: expected ARCH:TAG, ARCH:FILE, local-dir:DIR or hf-hub:REPO.")
    if source.startswith(OPEN_CLIP_SCHEMAS):
        from llava_ivtp.cli import is_hub_repo_id

        if source.startswith("hf-hub:") and not is_hub_repo_id(source[len("hf-hub:"):]):
            raise ConversionError(
                f"--clip {source}: hf-hub:REPO needs a hub repo id owner/name (a folder: local-dir:DIR)."
            )
        if source.startswith("local-dir:"):
            folder = Path(source[len("local-dir:"):])
            missing = [name for name in ("open_clip_config.json",) if not (folder / name).is_file()]
            weights = [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pth")]
            if not folder.is_dir() or missing or not weights:
                found = sorted(os.listdir(folder)) if folder.is_dir() else "nothing (no such folder)"
                raise ConversionError(
                    f"--clip {source}: an open_clip folder needs open_clip_config.json and weights "
                    f"(open_clip_model.safetensors or open_clip_pytorch_model.bin); {folder} has {found}."
                )
        return source, None
    arch, separator, weights = source.partition(":")
    if open_clip.get_model_config(arch) is None:
        raise ConversionError(
            f"--clip {source}: {arch!r} is not a built-in open_clip architecture (see `open_clip.list_models()`); "
            "for another architecture use local-dir:DIR with an open_clip_config.json."
        )
    if not separator or not weights:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ConversionError(f"--clip {source}: give the weights as {arch}:TAG ({', '.join(tags) or 'no tags'}) or {arch}:FILE.")
    if not Path(weights).is_file() and weights not in open_clip.list_pretrained_tags_by_model(arch):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ConversionError(
            f"--clip {source}: {weights!r} is neither an existing checkpoint file nor a pretrained tag of {arch} "
            f"({', '.join(tags) or 'none'})."
        )
    return arch, weights


def load_open_clip(source: str):
    """The open_clip model named by `--clip`, on CPU in float32, in eval mode."""
    import open_clip

    model_name, pretrained = parse_clip_source(source)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu", require_pretrained=True)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as error:
        raise ConversionError(f"--clip {source}: cannot load it: {type(error).__name__}: {error}") from error
    required = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "visual")
    missing = [name for name in required if getattr(model, name, None) is None]
    visual_missing = [name for name in ("class_embedding", "conv1", "positional_embedding", "proj") if getattr(model.visual, name, None) is None] if getattr(model, "visual", None) is not None else []
    if missing or visual_missing or not isinstance(model.text_projection, torch.nn.Parameter):
        raise ConversionError(
            f"--clip {source}: IVTP needs a plain OpenAI-style CLIP (text tower + ViT with a CLS token and a "
            f"projection, as LLaVA-1.5's ViT-L-14-336); {type(model).__name__} lacks {missing + visual_missing or 'a linear text projection'}."
        )
    return model.eval()


def clip_text_spec(clip_model, tokenizer_name: str) -> dict:
    """`IvtpConfig.clip_text_encoder` read off the loaded open_clip model's own modules."""
    from open_clip.transformer import QuickGELU

    from modeling_llava_ivtp.guidance_ivtp import validate_clip_text_encoder
    from modeling_llava_ivtp.processing_llava_ivtp import clip_tokenizer_for

    block = clip_model.transformer.resblocks[0]
    width = clip_model.transformer.width
    spec = {
        "model_name": tokenizer_name,
        "embed_dim": int(clip_model.text_projection.shape[1]),
        "quick_gelu": isinstance(block.mlp.gelu, QuickGELU),
        "text_cfg": {
            "context_length": int(clip_model.context_length),
            "vocab_size": int(clip_model.vocab_size),
            "width": int(width),
            "heads": int(block.attn.num_heads),
            "layers": int(clip_model.transformer.layers),
            "mlp_ratio": block.mlp.c_fc.out_features / width,
        },
    }
    validate_clip_text_encoder(spec)
    tokenizer = clip_tokenizer_for(tokenizer_name)
    if tokenizer.vocab_size != spec["text_cfg"]["vocab_size"] or tokenizer.context_length != spec["text_cfg"]["context_length"]:
        raise ConversionError(
            f"--clip-tokenizer {tokenizer_name}: its tokenizer has {tokenizer.vocab_size} tokens and context "
            f"{tokenizer.context_length}; the CLIP text tower has {spec['text_cfg']['vocab_size']} and "
            f"{spec['text_cfg']['context_length']}."
        )
    return spec


def _local_inputs(llava: str, clip: str, preset: str) -> list[tuple[str, Path]]:
    """The local files and folders the conversion reads: `--llava` (a folder), a local `--clip` (a `local-dir:DIR`
    or the FILE of `ARCH:FILE`) and `--preset`."""
    inputs = []
    if Path(llava).exists():
        inputs.append(("--llava", Path(llava)))
    if clip.startswith("local-dir:"):
        inputs.append(("--clip", Path(clip[len("local-dir:"):])))
    elif not clip.startswith(OPEN_CLIP_SCHEMAS):
        _, _, weights = clip.partition(":")
        if weights and Path(weights).exists():
            inputs.append(("--clip", Path(weights)))
    if Path(preset).exists():
        inputs.append(("--preset", Path(preset)))
    return inputs


def check_out_folder(out: Path, llava: str, clip: str, preset: str) -> None:
    """`--out` must be a folder (new or existing) that neither is, contains, nor lies inside an input: the
    converter never writes over what it reads. Checked before anything is read or written."""
    from llava_ivtp.cli import prepare_output

    prepare_output("--out", out, ConversionError, folder=True)
    target = out.resolve()
    for flag, path in _local_inputs(llava, clip, preset):
        source = path.resolve()
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(source):
            relation = "inside"
        else:
            continue
        raise ConversionError(
            f"--out {out}: {relation} {flag} {path}; the converter never writes where it reads (its files would be "
            "overwritten). Choose a separate folder."
        )


def _llava_config(llava: str):
    from transformers import AutoConfig

    folder = Path(llava)
    if folder.is_dir():
        missing = [] if (folder / "config.json").is_file() else ["config.json"]
        if not any((folder / name).is_file() for name in LLAVA_WEIGHT_FILES):
            missing.append(" or ".join(LLAVA_WEIGHT_FILES))
        if missing:
            raise ConversionError(f"--llava {llava}: not a llava-hf checkpoint folder, missing {', '.join(missing)}.")
    else:
        from llava_ivtp.cli import resolve_checkpoint

        resolve_checkpoint("--llava", llava, ConversionError)  # a file, or a path that does not exist: refused
    try:
        config = AutoConfig.from_pretrained(llava)
    except OSError as error:
        raise ConversionError(f"--llava {llava}: cannot read its config: {error}") from error
    if config.model_type not in HOSTS:
        raise ConversionError(
            f"--llava {llava}: expected a stock llava-hf checkpoint (model_type {' or '.join(map(repr, HOSTS))}), got "
            f"{config.model_type!r}."
        )
    return config


def _read_preset(preset: str):
    from modeling_llava_ivtp.configuration_llava_ivtp import IvtpConfig, IvtpNextConfig

    path = Path(preset)
    if not path.is_file():
        raise ConversionError(f"--preset {preset}: no such file (see configuration/*.json).")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"--preset {preset}: not JSON ({error}).") from error
    except OSError as error:
        raise ConversionError(f"--preset {preset}: cannot be read ({error}).") from error
    kinds = {"llava_ivtp": IvtpConfig, "llava_next_ivtp": IvtpNextConfig}
    if not isinstance(raw, dict) or raw.get("model_type") not in kinds or "schedule" not in raw:
        raise ConversionError(
            f"--preset {preset}: not an IVTP preset (needs model_type 'llava_ivtp' or 'llava_next_ivtp' and a schedule)."
        )
    try:
        return kinds[raw["model_type"]].from_dict(raw)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"--preset {preset}: {error}") from error


def check_preset_matches(preset, llava_config, preset_name: str, llava_name: str) -> None:
    """Refuse a preset made for another host or architecture, listing every field that differs."""
    wanted, host = HOSTS[llava_config.model_type]
    if preset.model_type != wanted:
        raise ConversionError(
            f"--preset {preset_name} is a {preset.model_type!r} preset; --llava {llava_name} is a {host} checkpoint "
            f"(model_type {llava_config.model_type!r}), which takes a {wanted!r} preset (configuration/*.json)."
        )
    differences = []
    sections = dict(PRESET_FIELDS)
    if wanted == "llava_next_ivtp":
        sections[None] = sections[None] + NEXT_PRESET_FIELDS
    for section, fields in sections.items():
        mine = getattr(preset, section) if section else preset
        theirs = getattr(llava_config, section) if section else llava_config
        for field in fields:
            if getattr(mine, field, None) != getattr(theirs, field, None):
                name = f"{section}.{field}" if section else field
                differences.append(f"{name}: preset {getattr(mine, field, None)!r}, checkpoint {getattr(theirs, field, None)!r}")
    if differences:
        raise ConversionError(
            f"--preset {preset_name} was made for another architecture than --llava {llava_name}:\n  "
            + "\n  ".join(differences)
        )


def check_same_vision_tower(model, clip_model, clip_name: str, llava_name: str) -> None:
    """The CLIP given must be the LLaVA vision tower's CLIP: embeddings and layer norms equal (to fp16 rounding)."""
    vision = model.model.vision_tower
    ours = dict(vision.named_parameters())
    theirs = dict(clip_model.visual.named_parameters())
    problems = []
    for hf_name, clip_name_ in VISION_EMBEDDINGS:
        a, b = ours[hf_name].detach().float(), theirs[clip_name_].detach().float()
        if a.shape != b.shape:
            problems.append(f"{hf_name} has shape {tuple(a.shape)}, CLIP visual.{clip_name_} {tuple(b.shape)}")
            continue
        tolerance = 2e-3 * max(a.abs().max().item(), 1e-6)  # llava-hf stores fp16; open_clip files may be fp32
        if (a - b).abs().max().item() > tolerance:
            problems.append(f"{hf_name} differs from CLIP visual.{clip_name_} (max |diff| {(a - b).abs().max().item():.3g})")
    proj = clip_model.visual.proj
    if proj.shape[0] != vision.config.hidden_size:
        problems.append(f"CLIP visual.proj maps width {proj.shape[0]}, the vision tower's hidden size is {vision.config.hidden_size}")
    if problems:
        raise ConversionError(
            f"--clip {clip_name} is not the CLIP of --llava {llava_name}'s vision tower:\n  " + "\n  ".join(problems)
        )


def _processor(llava: str, tokenizer_name: str, next_host: bool = False):
    from transformers import AutoProcessor, LlavaNextProcessor

    from modeling_llava_ivtp.processing_llava_ivtp import LLAVA_CHAT_TEMPLATE, LlavaIvtpProcessor, LlavaNextIvtpProcessor

    try:
        stock = AutoProcessor.from_pretrained(llava)
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"--llava {llava}: cannot load its processor (tokenizer, preprocessor_config.json, processor_config.json): {error}"
        ) from error
    wanted = LlavaNextProcessor if next_host else None
    if (not hasattr(stock, "image_processor") or not getattr(stock.tokenizer, "is_fast", False)
            or wanted is not None and not isinstance(stock, wanted)):
        expected = "a LlavaNextProcessor" if next_host else "a LlavaProcessor"
        raise ConversionError(f"--llava {llava}: needs {expected} with a fast tokenizer, got {type(stock).__name__}.")
    processor_class = LlavaNextIvtpProcessor if next_host else LlavaIvtpProcessor
    return processor_class(
        stock.image_processor,
        stock.tokenizer,
        patch_size=stock.patch_size,
        vision_feature_select_strategy=stock.vision_feature_select_strategy,
        num_additional_image_tokens=stock.num_additional_image_tokens,
        chat_template=stock.chat_template or LLAVA_CHAT_TEMPLATE,
        image_token=stock.image_token,
        clip_model_name=tokenizer_name,
    )


def _base_model_metadata(llava: str, base_model: str | None, license: str | None) -> tuple[str, str]:
    from huggingface_hub import ModelCard

    is_folder = Path(llava).is_dir()
    if base_model is None:
        if is_folder:
            raise ConversionError(f"--base-model: --llava {llava} is a folder; name the hub repo it came from (e.g. llava-hf/llava-1.5-7b-hf).")
        base_model = llava
    if license is None:
        card_path = Path(llava) / "README.md" if is_folder else None
        try:
            card = ModelCard.load(card_path if card_path is not None else llava)
            license = card.data.license
        except Exception:  # no README / no network: fall through to the error below
            license = None
        if not license:
            raise ConversionError(f"--license: --llava {llava} has no README.md license metadata; give the base model's license.")
    return base_model, license


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------
def convert(
    llava: str,
    clip: str,
    preset: str,
    out: str | os.PathLike,
    *,
    clip_tokenizer: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """Write the IVTP checkpoint of `llava` + `clip` with `preset`'s schedule to `out`; returns the folder."""
    from hub_cards import render_model_card

    out = Path(out)
    check_out_folder(out, llava, clip, preset)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"--out {out}: exists and is not empty (pass --overwrite to write into it).")
    checked = _check_inputs(llava, clip, preset, clip_tokenizer, dtype)
    base_model, license = _base_model_metadata(llava, base_model, license)
    model, processor = build(llava, clip, preset, dtype=dtype, checked=checked)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    card = render_model_card(
        model.config, base_model=base_model, license=license, clip_source=clip,
        command=command or f"llava-ivtp convert --llava {llava} --clip {clip} --preset {preset} --out {out}",
    )
    card.save(out / "README.md")
    return out


def _check_inputs(llava: str, clip: str, preset: str, clip_tokenizer: str | None, dtype: str):
    """The arguments' checks that need no weights: `(preset config, llava config, CLIP tokenizer name)`."""
    from modeling_llava_ivtp.processing_llava_ivtp import clip_tokenizer_for

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}.")
    preset_config = _read_preset(preset)
    llava_config = _llava_config(llava)
    check_preset_matches(preset_config, llava_config, preset, llava)
    model_name, _ = parse_clip_source(clip)
    if clip_tokenizer is None:
        if model_name.startswith(OPEN_CLIP_SCHEMAS):
            raise ConversionError(f"--clip-tokenizer: --clip {clip} is not a built-in architecture; name the built-in one whose tokenizer it uses (e.g. ViT-L-14-336).")
        clip_tokenizer = model_name
    try:
        clip_tokenizer_for(clip_tokenizer)
    except ValueError as error:
        raise ConversionError(f"--clip-tokenizer {clip_tokenizer}: {error}") from error
    return preset_config, llava_config, clip_tokenizer


def build(llava: str, clip: str, preset: str, *, clip_tokenizer: str | None = None, dtype: str = "auto",
          checked: tuple | None = None):
    """The IVTP model (eval mode) and processor of `llava` + `clip` with `preset`'s schedule, in memory: what
    `convert` writes. Every LLaVA tensor is checked to load; mismatched inputs raise `ConversionError`. `checked`:
    what `_check_inputs` returned for these arguments (else it is called here)."""
    from modeling_llava_ivtp.configuration_llava_ivtp import IvtpConfig, IvtpNextConfig
    from modeling_llava_ivtp.modeling_llava_ivtp import LlavaIvtpForConditionalGeneration
    from modeling_llava_ivtp.modeling_llava_next_ivtp import LlavaNextIvtpForConditionalGeneration

    preset_config, llava_config, clip_tokenizer = checked or _check_inputs(llava, clip, preset, clip_tokenizer, dtype)
    next_host = llava_config.model_type == "llava_next"
    config_class = IvtpNextConfig if next_host else IvtpConfig
    model_class = LlavaNextIvtpForConditionalGeneration if next_host else LlavaIvtpForConditionalGeneration
    processor = _processor(llava, clip_tokenizer, next_host)

    clip_model = load_open_clip(clip)
    spec = clip_text_spec(clip_model, clip_tokenizer)
    if preset_config.clip_text_encoder is not None and preset_config.clip_text_encoder != spec:
        raise ConversionError(f"--preset {preset}: its clip_text_encoder {preset_config.clip_text_encoder} is not --clip {clip}'s {spec}.")
    settings = llava_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        settings.pop(key, None)
    settings.update({key: getattr(preset_config, key) for key in PRESET_IVTP_FIELDS}, clip_text_encoder=spec)
    config = config_class(**settings)

    try:
        model, info = model_class.from_pretrained(
            llava, config=config, dtype=DTYPES[dtype], output_loading_info=True, clip_text_tower_loaded_later=True
        )
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        files = [name for name in LLAVA_WEIGHT_FILES if (Path(llava) / name).is_file()]
        raise ConversionError(
            f"--llava {llava}: cannot load its weights{' (' + ', '.join(files) + ')' if files else ''}: "
            f"{type(error).__name__}: {error}"
        ) from error
    not_clip = [key for key in info["missing_keys"] if not key.startswith(("clip_text_model.", "clip_visual_projection."))]
    problems = {"missing": not_clip, "unexpected": info["unexpected_keys"], "mismatched": info["mismatched_keys"]}
    if any(problems.values()):
        raise ConversionError(f"--llava {llava}: not every LLaVA tensor loaded: {problems}")
    check_same_vision_tower(model, clip_model, clip, llava)
    state = clip_model.state_dict()
    text_keys = list(model.clip_text_model.state_dict())
    with torch.no_grad():
        model.clip_text_model.load_state_dict({key: state[key] for key in text_keys}, strict=True)
        model.clip_visual_projection.load_state_dict({"weight": clip_model.visual.proj.detach().t()}, strict=True)
    return model.eval(), processor


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None, api=None):
    """Upload `folder` to the hub repo `repo_id`, then pin the card's usage snippet to the commit just made.

    `api` defaults to `huggingface_hub.HfApi(token=token)`; anything with `create_repo`, `upload_folder` and
    `upload_file` of the same signatures works. Returns the `CommitInfo` of the card update.
    """
    from huggingface_hub import HfApi, ModelCard

    from hub_cards import render_model_card
    from modeling_llava_ivtp.configuration_llava_ivtp import IvtpConfig, IvtpNextConfig

    folder = Path(folder)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Add IVTP checkpoint (llava-ivtp convert)")
    old = ModelCard.load(folder / "README.md")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    config = (IvtpNextConfig if model_type == IvtpNextConfig.model_type else IvtpConfig).from_pretrained(folder)
    clip_source = _card_field(old.content, "CLIP text tower and visual projection: open_clip `")
    command = _card_field(old.content, "Converted with: `")
    card = render_model_card(
        config, base_model=old.data.base_model, license=old.data.license, clip_source=clip_source,
        repo_id=repo_id, revision=commit.oid, command=command,
    )
    card.save(folder / "README.md")
    return api.upload_file(
        path_or_fileobj=str(folder / "README.md"), path_in_repo="README.md", repo_id=repo_id, repo_type="model",
        commit_message=f"Model card: pin the usage snippet to revision {commit.oid}",
    )


def _card_field(content: str, prefix: str) -> str:
    """A value the card template writes after `prefix` in backquotes (cards made by `llava-ivtp convert`)."""
    start = content.find(prefix)
    if start < 0:
        raise ConversionError(f"--push-to-hub: README.md was not written by `llava-ivtp convert` (no {prefix!r}); re-run the conversion.")
    start += len(prefix)
    return content[start:content.index("`", start)]


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llava", required=True, help="stock llava-hf checkpoint: folder or hub repo id (llava-hf/llava-1.5-7b-hf)")
    parser.add_argument(
        "--clip", required=True,
        help="the vision tower's open_clip CLIP: ARCH:TAG (ViT-L-14-336:openai), ARCH:FILE, local-dir:DIR or hf-hub:REPO",
    )
    parser.add_argument("--preset", required=True, help="IVTP preset JSON, e.g. configuration/llava-1.5-7b-ivtp.json")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--clip-tokenizer", help="built-in open_clip architecture whose tokenizer the CLIP uses (default: --clip's ARCH)")
    parser.add_argument("--base-model", help="hub repo id of --llava for the model card (default: --llava when it is a repo id)")
    parser.add_argument("--license", help="license for the card (default: the base model card's)")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float16, bfloat16 or float32")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this hub repo (needs a token)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def run(args: argparse.Namespace) -> int:
    command = "llava-ivtp convert " + " ".join(
        f"--{flag.replace('_', '-')} {shlex.quote(str(value))}"
        for flag, value in (("llava", args.llava), ("clip", args.clip), ("preset", args.preset), ("out", args.out))
    )
    try:
        folder = convert(
            args.llava, args.clip, args.preset, args.out, clip_tokenizer=args.clip_tokenizer, base_model=args.base_model,
            license=args.license, dtype=args.dtype, overwrite=args.overwrite, command=command,
        )
        print(f"wrote {folder}")
        if args.push_to_hub:
            commit = push_to_hub(folder, args.push_to_hub, private=args.private)
            print(f"pushed to {args.push_to_hub}; card pinned at {commit.oid}")
    except ConversionError as error:
        from llava_ivtp.cli import report_error

        return report_error("convert", error)
    return 0
