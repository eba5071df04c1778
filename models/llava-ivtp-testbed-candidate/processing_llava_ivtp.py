"""`LlavaIvtpProcessor` and `LlavaNextIvtpProcessor`: the stock `LlavaProcessor` and `LlavaNextProcessor` plus IVTP's
instruction guidance inputs (paper sec. 3.3).

On top of `input_ids`, `attention_mask` and `pixel_values` it returns, per sample:

- `instruction_mask` `(batch, sequence)`: the tokens of the instruction (the user's text; not image placeholders,
  not chat-template role words, not answers), the tokens eq. 8 may average;
- `clip_input_ids` `(batch, clip_context)`: the instruction tokenized by CLIP's tokenizer (start, content, end,
  zero padding), exactly what `open_clip.get_tokenizer(clip_model_name)(instruction)` gives;
- `clip_token_spans` `(batch, sequence, 2)`: for each instruction token, the range `[start, end)` of
  `clip_input_ids` positions whose characters overlap its own (eq. 7); `(0, 0)` for none.

Where the instruction is, per prompt (first that applies):
1. `instruction_spans=` character ranges in the prompt (what `apply_chat_template` passes);
2. `instruction=` its text (the last occurrence in the prompt is used);
3. the last user turn of the LLaVA-1.5 conversation format: after the last `instruction_start` ("USER:") up to the
   next `instruction_end` ("ASSISTANT:") or the end of the prompt;
4. a prompt without `instruction_start`: the whole prompt.
Image placeholders are never part of it. `apply_chat_template` takes the last user turn's text blocks.

CLIP reads at most `context_length - 2` (75) content tokens: instruction tokens whose text lies past that get no
CLIP token (`(0, 0)`), so they have no relevance and are never selected by threshold; they stay in
`instruction_mask` (the guidance modes that do not use CLIP still average them).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import LlavaNextProcessor, LlavaProcessor

from .guidance_ivtp import align_llm_to_clip, clip_tokens_with_spans


GUIDANCE_OUTPUTS = ("instruction_mask", "clip_input_ids", "clip_token_spans")
# LLaVA-1.5's conversation format ("USER: <image>\n{question} ASSISTANT: {answer}") as a chat template; the default
# `instruction_start` / `instruction_end` markers are its role words.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for block in message['content'] %}{% if block['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for block in message['content'] %}{% if block['type'] == 'text' %}{{ block['text'] + ' ' }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Private-use characters that mark the user's text blocks while locating them in a rendered chat template.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


@functools.lru_cache(maxsize=4)
def clip_tokenizer_for(clip_model_name: str):
    """open_clip's tokenizer of a built-in architecture; only the plain CLIP BPE tokenizer (bundled with open_clip,
    nothing is downloaded) is accepted."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    if not isinstance(clip_model_name, str) or ":" in clip_model_name:
        raise ValueError(
            f"`clip_model_name` must be the name of a built-in open_clip architecture (e.g. 'ViT-L-14-336'), got "
            f"{clip_model_name!r}; hub or local schemas are not accepted (the processor never downloads)."
        )
    config = open_clip.get_model_config(clip_model_name)
    if config is None:
        raise ValueError(f"`clip_model_name`: open_clip has no architecture {clip_model_name!r}; see `open_clip.list_models()`.")
    text_cfg = config.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or "siglip" in clip_model_name.lower():
        raise ValueError(
            f"`clip_model_name` {clip_model_name!r} uses a Hugging Face / SigLIP tokenizer; IVTP needs the plain CLIP "
            "BPE tokenizer (OpenAI-style architectures such as 'ViT-L-14-336')."
        )
    tokenizer = open_clip.get_tokenizer(clip_model_name)
    if not isinstance(tokenizer, SimpleTokenizer) or tokenizer.reduction_fn is not None:
        raise ValueError(f"`clip_model_name` {clip_model_name!r}: expected open_clip's plain SimpleTokenizer, got {tokenizer!r}.")
    return tokenizer


def _shares_a_character(span: tuple[int, int], ranges: list[tuple[int, int]], text: str) -> bool:
    for start, end in ranges:
        low, high = max(span[0], start), min(span[1], end)
        if high > low and not text[low:high].isspace():
            return True
    return False


def _split_at(ranges: list[tuple[int, int]], text: str, token: str) -> list[tuple[int, int]]:
    """`ranges` without the occurrences of `token` (image placeholders are never instruction)."""
    pieces = []
    for start, end in ranges:
        cursor = start
        while True:
            found = text.find(token, cursor, end) if token else -1
            if found < 0:
                break
            if found > cursor:
                pieces.append((cursor, found))
            cursor = found + len(token)
        if end > cursor:
            pieces.append((cursor, end))
    return pieces


class IvtpGuidance:
    r"""What `LlavaIvtpProcessor` (LLaVA-1.5) and `LlavaNextIvtpProcessor` (LLaVA-NeXT) add to their stock processor:
    IVTP's guidance inputs (`instruction_mask`, `clip_input_ids`, `clip_token_spans`; see the module docstring).
    Needs a fast (🤗 tokenizers) tokenizer, for character offsets.

    Args (on top of the stock processor's):
        clip_model_name (`str`, defaults to `"ViT-L-14-336"`):
            The open_clip architecture whose tokenizer tokenizes the instruction; the model's
            `config.clip_text_encoder["model_name"]`.
        instruction_start (`str`, defaults to `"USER:"`), instruction_end (`str`, defaults to `"ASSISTANT:"`):
            The conversation markers that delimit the last user turn of a raw prompt (LLaVA-1.5's format).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        clip_model_name="ViT-L-14-336",
        instruction_start="USER:",
        instruction_end="ASSISTANT:",
        **kwargs,
    ):
        clip_tokenizer_for(clip_model_name)  # fails early, naming the field
        for name, value in (("instruction_start", instruction_start), ("instruction_end", instruction_end)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty string, got {value!r}.")
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(self).__name__} needs a fast tokenizer (🤗 tokenizers backend): the instruction is located by "
                f"character offsets, which {type(tokenizer).__name__} does not return."
            )
        self.clip_model_name = clip_model_name
        self.instruction_start = instruction_start
        self.instruction_end = instruction_end
        super().__init__(
            image_processor,
            tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    @property
    def clip_tokenizer(self):
        return clip_tokenizer_for(self.clip_model_name)

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, *GUIDANCE_OUTPUTS]

    # ------------------------------------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, videos=None, audio=None, instruction=None, instruction_spans=None, **kwargs):
        r"""
        Same as the stock processor's `__call__`, plus:

        instruction (`str` or `list[str | None]`, *optional*):
            The instruction's text in each prompt (its last occurrence is used); `None` entries use the default.
        instruction_spans (`list[list[tuple[int, int]]]`, *optional*):
            Per prompt, the character ranges `[start, end)` of the instruction (`apply_chat_template` passes these).
        """
        if text is None:
            if instruction is not None or instruction_spans is not None:
                raise ValueError("`instruction` / `instruction_spans` need `text` (the prompts they are part of).")
            return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else [None]
        if not texts or not all(isinstance(sample, str) for sample in texts):
            raise ValueError("`text` must be a string or a list of strings (LlavaIvtpProcessor locates the instruction in it).")
        ranges = self._instruction_ranges(texts, instruction, instruction_spans)

        text_kwargs = kwargs.get("text_kwargs", {})
        wants_offsets = kwargs.get("return_offsets_mapping", text_kwargs.get("return_offsets_mapping", False))
        wants_replacements = kwargs.get("return_text_replacement_offsets", False)
        if "return_offsets_mapping" in text_kwargs:
            kwargs["text_kwargs"] = {**text_kwargs, "return_offsets_mapping": True}
        else:
            kwargs["return_offsets_mapping"] = True
        kwargs["return_text_replacement_offsets"] = True
        outputs = super().__call__(images=images, text=texts, videos=videos, audio=audio, **kwargs)

        offsets = outputs["offset_mapping"] if wants_offsets else outputs.pop("offset_mapping")
        replacements = outputs["text_replacement_offsets"] if wants_replacements else outputs.pop("text_replacement_offsets")
        input_ids = outputs["input_ids"]
        as_lists = [_to_list(row) for row in input_ids]
        guidance = {name: [] for name in GUIDANCE_OUTPUTS}
        for row, sample in enumerate(texts):
            mask, clip_ids, spans = self._guidance_of_sample(
                sample, ranges[row], as_lists[row], [tuple(pair) for pair in _to_list(offsets[row])], replacements[row]
            )
            guidance["instruction_mask"].append(mask)
            guidance["clip_input_ids"].append(clip_ids)
            guidance["clip_token_spans"].append(spans)
        for name, values in guidance.items():
            outputs[name] = _like(values, input_ids)
        return outputs

    def _instruction_ranges(self, texts: list[str], instruction, instruction_spans) -> list[list[tuple[int, int]]]:
        """Per prompt, the instruction's character ranges, image placeholders cut out."""
        count = len(texts)
        if instruction_spans is not None:
            if len(instruction_spans) != count:
                raise ValueError(f"`instruction_spans` must have one entry per prompt ({count}), got {len(instruction_spans)}.")
            ranges = []
            for row, spans in enumerate(instruction_spans):
                spans = [tuple(int(value) for value in span) for span in spans]
                if any(len(span) != 2 or not 0 <= span[0] <= span[1] <= len(texts[row]) for span in spans):
                    raise ValueError(
                        f"`instruction_spans[{row}]` must be (start, end) character ranges within the prompt "
                        f"(0..{len(texts[row])}), got {spans}."
                    )
                ranges.append(spans)
        else:
            if instruction is None:
                instruction = [None] * count
            elif isinstance(instruction, str):
                if count != 1:
                    raise ValueError(f"`instruction` must be a list with one entry per prompt ({count}) for a batch.")
                instruction = [instruction]
            if len(instruction) != count:
                raise ValueError(f"`instruction` must have one entry per prompt ({count}), got {len(instruction)}.")
            ranges = []
            for row, (sample, wanted) in enumerate(zip(texts, instruction)):
                if wanted is None:
                    ranges.append([self._last_user_turn(sample)])
                    continue
                if not isinstance(wanted, str):
                    raise ValueError(f"`instruction[{row}]` must be a string or None, got {type(wanted).__name__}.")
                start = sample.rfind(wanted)
                if start < 0 or not wanted:
                    raise ValueError(f"`instruction[{row}]` {wanted!r} is not in prompt {row}: {sample!r}.")
                ranges.append([(start, start + len(wanted))])
        return [_split_at(sorted(spans), sample, self.image_token) for spans, sample in zip(ranges, texts)]

    def _last_user_turn(self, text: str) -> tuple[int, int]:
        start = text.rfind(self.instruction_start)
        if start < 0:
            return (0, len(text))
        start += len(self.instruction_start)
        end = text.find(self.instruction_end, start)
        return (start, len(text) if end < 0 else end)

    def _guidance_of_sample(self, text, ranges, input_ids, offsets, replacements):
        """The three guidance rows of one prompt: instruction mask, CLIP ids, CLIP span per token."""
        clip_tokenizer = self.clip_tokenizer
        context = clip_tokenizer.context_length
        # CLIP reads the instruction's characters only: the rest of the stretch they cover is blanked.
        clip_ids, clip_spans = [], []
        if ranges:
            first, last = ranges[0][0], ranges[-1][1]
            blanked = [" "] * (last - first)
            for start, end in ranges:
                blanked[start - first : end - first] = text[start:end]
            clip_ids, clip_spans = clip_tokens_with_spans(clip_tokenizer, "".join(blanked))
            clip_spans = [(start + first, end + first) for start, end in clip_spans]
        kept = min(len(clip_ids), context - 2)
        clip_row = [clip_tokenizer.sot_token_id, *clip_ids[:kept], clip_tokenizer.eot_token_id]
        clip_row += [0] * (context - len(clip_row))

        # Offsets are in the text after image placeholders were expanded: move ranges and spans there.
        expanded = _expanded_text(text, replacements)
        shift = expanded_position_function(replacements)
        ranges = [(shift(start), shift(end)) for start, end in ranges]
        clip_spans = [(shift(start), shift(end)) for start, end in clip_spans]
        tokens = self.tokenizer.convert_ids_to_tokens(input_ids)
        mask = []
        for token_id, token, span in zip(input_ids, tokens, offsets):
            mask.append(
                int(
                    span[1] > span[0]
                    and token_id != self.image_token_id
                    and token.replace("\u2581", " ").strip() != ""  # a Metaspace "▁" alone is given the next char's offset
                    and _shares_a_character(span, ranges, expanded)
                )
            )
        chosen = [span for span, flag in zip(offsets, mask) if flag]
        aligned = iter(align_llm_to_clip(chosen, clip_spans, expanded, first_clip_position=1, num_clip_positions=kept))
        token_spans = [list(next(aligned)) if flag else [0, 0] for flag in mask]
        return mask, clip_row, token_spans

    # ------------------------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, chat_template=None, tokenize=False, return_dict=False, processor_kwargs=None, **kwargs):
        """[`ProcessorMixin.apply_chat_template`]; when tokenizing, the instruction is the text of each
        conversation's last user turn, located exactly in the rendered prompt."""
        if not tokenize:
            return super().apply_chat_template(
                conversation, chat_template=chat_template, tokenize=False, return_dict=return_dict,
                processor_kwargs=processor_kwargs, **kwargs,
            )
        if kwargs.get("sanitize_control_tokens"):
            raise ValueError(
                "LlavaIvtpProcessor.apply_chat_template does not support `sanitize_control_tokens=True`: the "
                "instruction could not be located in the marked prompt. Render with tokenize=False and call the "
                "processor with `instruction=`."
            )
        render_kwargs = {key: value for key, value in kwargs.items() if key not in ("return_tensors", "return_assistant_tokens_mask")}
        conversations, _ = self._normalize_conversations(conversation)
        marked_conversations = [self._mark_last_user_turn(turns) for turns in conversations]
        marked = super().apply_chat_template(marked_conversations, chat_template=chat_template, tokenize=False, **render_kwargs)
        plain = super().apply_chat_template(conversations, chat_template=chat_template, tokenize=False, **render_kwargs)
        spans = []
        for row, (marked_prompt, prompt) in enumerate(zip(marked, plain)):
            unmarked, row_spans = _unmark(marked_prompt)
            if unmarked != prompt:
                raise ValueError(
                    f"The chat template changes the user's text in conversation {row} (e.g. trims it), so the "
                    "instruction cannot be located exactly; render with tokenize=False and call the processor with "
                    "`instruction=`."
                )
            spans.append(row_spans)
        processor_kwargs = {**(processor_kwargs or {}), "instruction_spans": spans}
        return super().apply_chat_template(
            conversation, chat_template=chat_template, tokenize=True,
            return_dict=return_dict, processor_kwargs=processor_kwargs, **kwargs,
        )

    @staticmethod
    def _mark_last_user_turn(turns: list[dict]) -> list[dict]:
        """A copy of the conversation with each text block of its last user turn wrapped in marks (the images and
        other blocks are shared, not copied)."""
        turns = list(turns)
        for index in range(len(turns) - 1, -1, -1):
            message = turns[index]
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                content = _MARK_OPEN + content + _MARK_CLOSE
            elif isinstance(content, list):
                content = [
                    {**block, "text": _MARK_OPEN + block.get("text", "") + _MARK_CLOSE}
                    if isinstance(block, dict) and block.get("type") == "text"
                    else block
                    for block in content
                ]
            turns[index] = {**message, "content": content}
            break
        return turns


def _unmark(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the marks; return the text and the ranges they enclosed."""
    pieces, spans, cursor, length = [], [], 0, 0
    while True:
        opening = marked.find(_MARK_OPEN, cursor)
        if opening < 0:
            pieces.append(marked[cursor:])
            break
        closing = marked.find(_MARK_CLOSE, opening)
        pieces.append(marked[cursor:opening])
        length += opening - cursor
        content = marked[opening + 1 : closing]
        pieces.append(content)
        spans.append((length, length + len(content)))
        length += len(content)
        cursor = closing + 1
    return "".join(pieces), spans


def _expanded_text(text: str, replacements: list[dict]) -> str:
    pieces, cursor = [], 0
    for replacement in replacements:
        start, end = replacement["span"]
        pieces += [text[cursor:start], replacement["replacement"]]
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


def expanded_position_function(replacements: list[dict]):
    """Maps a character position of a prompt (outside its placeholders) to the prompt after the processor expanded
    them; `replacements` is one row of the processor's `text_replacement_offsets`."""
    ends = [replacement["span"][1] for replacement in replacements]
    gains = [replacement["new_span"][1] - replacement["span"][1] for replacement in replacements]

    def shift(position: int) -> int:
        gain = 0
        for end, total in zip(ends, gains):
            if end <= position:
                gain = total
        return position + gain

    return shift


def _to_list(values):
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _like(rows: list, reference):
    """`rows` in the container type of the tokenizer's `input_ids` (torch, numpy or lists)."""
    if isinstance(reference, torch.Tensor):
        return torch.tensor(rows, dtype=torch.long)
    if isinstance(reference, np.ndarray):
        return np.array(rows, dtype=np.int64)
    return rows


class LlavaIvtpProcessor(IvtpGuidance, LlavaProcessor):
    r"""
    [`LlavaProcessor`] that also returns IVTP's guidance inputs (`instruction_mask`, `clip_input_ids`,
    `clip_token_spans`); see the module docstring and [`IvtpGuidance`] for the arguments it adds.
    """


class LlavaNextIvtpProcessor(IvtpGuidance, LlavaNextProcessor):
    r"""
    [`LlavaNextProcessor`] (LLaVA-NeXT: each image's crops and size, as many placeholders as its packed sequence)
    that also returns IVTP's guidance inputs (`instruction_mask`, `clip_input_ids`, `clip_token_spans`); see the
    module docstring and [`IvtpGuidance`] for the arguments it adds.
    """


# Remote code: `save_pretrained` copies this file (and what it imports) and writes `auto_map["AutoProcessor"]`.
LlavaIvtpProcessor.register_for_auto_class()
LlavaNextIvtpProcessor.register_for_auto_class()

__all__ = [
    "GUIDANCE_OUTPUTS", "LLAVA_CHAT_TEMPLATE", "IvtpGuidance", "LlavaIvtpProcessor", "LlavaNextIvtpProcessor",
    "clip_tokenizer_for", "expanded_position_function",
]
