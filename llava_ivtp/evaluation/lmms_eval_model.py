"""The `llava_ivtp` model of lmms-eval: standard benchmarks with any pruning method and budget, no patching.

    pip install "llava-ivtp[lmms-eval]"
    lmms-eval --model llava_ivtp --model_args pretrained=me/llava-1.5-7b-ivtp,method=ivtp,budget=64 \
        --tasks gqa,pope,mme --batch_size 8 --output_path results/

lmms-eval (0.7) finds this model through the `lmms_eval.models` entry point of this package (`manifests`). It is a
"simple" lmms-eval model: requests carry the task's prompt, its `gen_kwargs` and a function giving the document's
images. Prompts go through the checkpoint's `LlavaIvtpProcessor` and chat template, so IVTP's instruction guidance
reaches the model as with `llava-ivtp eval` (whose settings, batching and greedy decoding this model shares, so the
two give the same answers on the same questions).

`model_args` (lmms-eval's `key=value,...`):

- `pretrained`: a converted IVTP folder or hub id (loaded with `trust_remote_code`, as `llava-ivtp eval` does; the
  checkpoint picks its host: a LLaVA-NeXT one loads `LlavaNextIvtpForConditionalGeneration` and
  `LlavaNextIvtpProcessor`), or a stock llava-hf checkpoint (LLaVA-1.5 or LLaVA-NeXT) together with `preset` (an IVTP
  preset of its host, such as `llava-1.5-7b-ivtp.json` or `llava-v1.6-vicuna-7b-ivtp.json`) and
  `clip` (its open_clip CLIP, as `llava-ivtp convert --clip` takes it), converted in memory;
- `method`: a registered pruning method (`ivtp`, `fastv`, `divprune`, ...), or `none` for stock Llava (every token);
  default: the checkpoint's own;
- `budget`: visual tokens per image in the LLM's last layers (each method maps it to its own schedule; IVTP's is
  `pruner_base.budget_schedule`'s, as `llava-ivtp eval --settings ivtp@K`); `schedule`: IVTP's schedule as JSON
  (`'{"vision": [...], "llm": [...]}'`) instead; `pruning_options`: the method's other options as JSON;
- `guidance` (IVTP's pseudo-CLS: `clip_relevance`, `instruction_mean`, `embedding_relevance`, `visual_cls`), `tau`;
- `dtype` (`auto`, `float16`, `bfloat16`, `float32`), `device` (default: cuda when there is one, else cpu),
  `device_map` (e.g. `auto`), `batch_size`, `attn_implementation` (any backend), `max_new_tokens` (used when the
  task sets none; default 128), `trust_remote_code` (default true).

Not supported: `generate_until_multi_round` (refused with an error naming it).
"""

from __future__ import annotations

import json

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm


MODEL_ID = "llava_ivtp"
DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_MAX_NEW_TOKENS = 128


def manifests():
    """The `lmms_eval.models` entry point: this package's lmms-eval models."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaIvtp")]


def _json_arg(name: str, value):
    """A JSON `model_args` value (lmms-eval passes it as a string)."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"model_args `{name}` must be a JSON object, e.g. {name}='{{\"visual_tokens\": 64}}', got {value!r}.")
    return parsed


def pruning_setting(config, method=None, budget=None, schedule=None, pruning_options=None, guidance=None, tau=None):
    """The `llava-ivtp eval` setting the `model_args` name (`None`: the checkpoint's config as it is), checked."""
    from llava_ivtp.evaluation.eval import EvalError, Setting, parse_setting
    from modeling_llava_ivtp.configuration_llava_ivtp import GUIDANCE_MODES, PRUNING_METHODS

    if method is not None and method not in ("none", *PRUNING_METHODS):
        raise ValueError(f"model_args `method` must be `none` or one of {list(PRUNING_METHODS)}, got {method!r}.")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"model_args `budget` must be a visual-token count >= 1, got {budget!r}.")
    if guidance is not None and guidance not in GUIDANCE_MODES:
        raise ValueError(f"model_args `guidance` must be one of {list(GUIDANCE_MODES)}, got {guidance!r}.")
    if method == "none":
        extra = [name for name, value in (("budget", budget), ("schedule", schedule), ("pruning_options", pruning_options),
                                          ("guidance", guidance), ("tau", tau)) if value is not None]
        if extra:
            raise ValueError(f"model_args method=none (stock Llava) takes no {extra}.")
        return Setting("full", {"pruning_method": None})
    if budget is not None and schedule is not None:
        raise ValueError("model_args `budget` and `schedule` both given: give one (the budget derives a schedule).")
    method = method if method is not None else (config.pruning_method or "ivtp")
    schedule, options = _json_arg("schedule", schedule), _json_arg("pruning_options", pruning_options)
    fields = {}
    if budget is not None:
        spec = f"{method}@{budget}" + (f":{guidance}" if guidance is not None and method == "ivtp" else "")
        try:
            fields = dict(parse_setting(spec, config).fields)
        except EvalError as error:
            raise ValueError(f"model_args method={method},budget={budget}: {error}") from None
    elif schedule is not None:
        if method != "ivtp":
            raise ValueError(f"model_args `schedule` is IVTP's; method={method!r} takes a `budget`.")
        fields = {"pruning_method": "ivtp", "pruning_options": None, "schedule": schedule}
    elif method != config.pruning_method:
        fields = {"pruning_method": method, "pruning_options": None}
        if method != "ivtp":
            fields["schedule"] = None
    if options is not None:
        merged = dict(fields.get("pruning_options", config.pruning_options) or {})
        merged.update(options)
        fields["pruning_options"] = merged
    if guidance is not None:
        fields["guidance"] = guidance
    if tau is not None:
        fields["tau"] = float(tau)
    if not fields:
        return None
    setting = Setting(f"{method}" + (f"@{budget}" if budget is not None else ""), fields)
    try:
        setting.config_of(config)
    except ValueError as error:
        raise ValueError(f"model_args give an invalid pruning config: {error}") from None
    return setting


def load_model(pretrained: str, *, preset=None, clip=None, clip_tokenizer=None, dtype="auto", device_map=None,
               attn_implementation=None, trust_remote_code=True):
    """`(model, processor)`: a converted IVTP checkpoint, or a stock llava-hf one + `preset` + `clip` converted in
    memory (`llava-ivtp convert` without writing)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ValueError(f"model_args `dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
    if preset is not None or clip is not None:
        if preset is None or clip is None:
            raise ValueError("model_args `preset` and `clip` go together: a stock llava-hf `pretrained` needs both "
                             "(the schedule, and the CLIP whose text tower guides stage 2).")
        from llava_ivtp.conversion.convert import ConversionError, build

        try:
            model, processor = build(pretrained, clip, preset, clip_tokenizer=clip_tokenizer, dtype=dtype)
        except ConversionError as error:
            message = str(error)
            for flag, field in (("--llava", "pretrained"), ("--clip-tokenizer", "clip_tokenizer"),
                                ("--clip", "clip"), ("--preset", "preset"), ("--dtype", "dtype")):
                message = message.replace(flag, f"model_args `{field}`")
            raise ValueError(message) from None
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if device_map is not None:
            raise ValueError("model_args `device_map` applies to a converted checkpoint; with `preset` the model is "
                             "built in memory: use `device`.")
        return model, processor
    config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    if config.model_type in ("llava", "llava_next"):
        raise ValueError(f"model_args `pretrained` {pretrained!r} is a stock llava-hf checkpoint: give `preset` (an "
                         "IVTP preset JSON of its host) and `clip` (its open_clip CLIP) to convert it, or a converted "
                         "IVTP checkpoint.")
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": DTYPES[dtype]}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs)
    processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    return model, processor


class LlavaIvtp(lmms):
    """lmms-eval's view of a `LlavaIvtpForConditionalGeneration` (see the module docstring for `model_args`)."""

    is_simple = True

    def __init__(self, pretrained: str, method=None, budget=None, schedule=None, pruning_options=None, guidance=None,
                 tau=None, preset=None, clip=None, clip_tokenizer=None, dtype="auto", device=None, device_map=None,
                 batch_size=1, attn_implementation=None, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                 trust_remote_code=True, **kwargs) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # lmms-eval's, for batch_size=auto (not supported: a number is needed)
        if kwargs:
            raise ValueError(f"model_args {sorted(kwargs)} are not arguments of llava_ivtp; see its docstring "
                             "(pretrained, method, budget, schedule, pruning_options, guidance, tau, preset, clip, "
                             "dtype, device, device_map, batch_size, attn_implementation, max_new_tokens).")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a number >= 1 for llava_ivtp, got {batch_size!r}.") from None
        if self.batch_size_per_gpu < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size!r}, {max_new_tokens!r}.")
        self.max_new_tokens = int(max_new_tokens)
        model, processor = load_model(
            str(pretrained), preset=preset, clip=clip, clip_tokenizer=clip_tokenizer, dtype=dtype,
            device_map=device_map, attn_implementation=attn_implementation,
            trust_remote_code=bool(trust_remote_code),
        )
        self.setting = pruning_setting(model.config, method, budget, schedule, pruning_options, guidance, tau)
        if self.setting is not None:
            self.setting.apply_to(model.config)  # on the model's own config, which its submodules hold too
        if device_map is None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = model.to(device)
        self._model = model.eval()
        self.processor = processor
        processor.tokenizer.padding_side = "left"  # batched generation: prompts end together
        self._device = model.device

    # -- lmms-eval's conventions ---------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    # -- prompts ---------------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        visuals = [visual for visual in (visuals or []) if visual is not None]
        from PIL import Image

        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise ValueError(f"task {task!r}: llava_ivtp takes images (PIL), got a {type(visual).__name__}.")
        return [visual.convert("RGB") for visual in visuals]

    def prompt(self, context: str, num_images: int) -> str:
        """The chat-template prompt of one request: the images first, then the task's text (the LLaVA-1.5 layout,
        `USER: <image>\\n{text} ASSISTANT:`), as `llava-ivtp eval` builds it."""
        image_token = getattr(self.processor, "image_token", "<image>")
        text = context.replace(image_token, "").strip() if num_images else context
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _inputs(self, prompts: list[str], images: list):
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    # -- requests --------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batches of `batch_size` requests with the same `gen_kwargs`, in the tasks' order; greedy unless the task
        samples; the text is cut at the first of the task's `until` strings."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_ivtp generate")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            generate_kwargs, until = self._generate_kwargs(gen_kwargs)
            for begin in range(0, len(indices), self.batch_size):
                chunk = indices[begin:begin + self.batch_size]
                prompts, images = [], []
                for index in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    visuals = self._visuals(doc_to_visual, doc_id, task, split)
                    prompts.append(self.prompt(context, len(visuals)))
                    images += visuals
                inputs = self._inputs(prompts, images)
                with torch.no_grad():
                    generated = self.model.generate(**inputs, **generate_kwargs)
                texts = self.processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                for index, text in zip(chunk, texts):
                    for stop in until:
                        text = text.split(stop)[0]
                    results[index] = text.strip()
                    self.cache_hook.add_partial("generate_until", (requests[index].args[0], gen_kwargs), results[index])
                progress.update(len(chunk))
        progress.close()
        return results

    def _generate_kwargs(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        kwargs = {"max_new_tokens": int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens)),
                  "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1), "do_sample": do_sample}
        top_p = gen_kwargs.pop("top_p", None)
        if do_sample:
            kwargs["temperature"] = temperature if temperature > 0 else 1.0
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        gen_kwargs.pop("image_aspect_ratio", None)  # LLaVA's own scripts' option: the processor resizes
        if gen_kwargs:
            kwargs.update(gen_kwargs)  # any other generate() argument the task sets (e.g. repetition_penalty)
        return kwargs, [stop for stop in until if stop]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request, the mean negative log-likelihood of the continuation after the prompt (lmms-eval picks the
        choice with the lowest), and whether greedy decoding would have produced it."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="llava_ivtp loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            document = self.task_dict[task][split][doc_id]
            continuation = continuation(document) if callable(continuation) else continuation
            if isinstance(continuation, list):
                continuation = continuation[0]
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self.prompt(context, len(visuals))
            prompt_length = self._inputs([prompt], visuals)["input_ids"].shape[1]
            inputs = self._inputs([prompt + str(continuation)], visuals)
            labels = inputs["input_ids"].clone()
            labels[:, :prompt_length] = -100
            if not bool((labels != -100).any()):
                raise ValueError(f"task {task!r}, document {doc_id}: the continuation {continuation!r} adds no token.")
            with torch.no_grad():
                output = self.model(**inputs, labels=labels, use_cache=False)
            # Logits sit at the kept positions (pruned: image tokens dropped; continuation tokens are text, all kept).
            ids = inputs["input_ids"][0]
            kept = getattr(output, "kept_positions", None)
            positions = kept[0] if kept is not None else torch.arange(ids.shape[0], device=ids.device)
            targets = ids[positions[1:]]
            predicted = output.logits[0, :-1].argmax(dim=-1)
            in_continuation = positions[1:] >= prompt_length
            greedy = bool((predicted[in_continuation] == targets[in_continuation]).all())
            results.append((float(output.loss), greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "llava_ivtp does not implement generate_until_multi_round (multi-round tasks): run single-round tasks, "
            "or generate the rounds with transformers' `generate` and the returned cache."
        )


__all__ = ["LlavaIvtp", "MODEL_ID", "load_model", "manifests", "pruning_setting"]
