"""LlavaIvtpProcessor: the instruction mask, CLIP ids and LLM<->CLIP spans for single prompts, padded batches and
chat conversations, CLIP's 77-token limit, saving, and the model fed by it (and by the stock LlavaProcessor)."""

import logging

import open_clip
import pytest
import torch
from transformers import LlavaProcessor
from transformers.utils import logging as hf_logging

from modeling_llava_ivtp import LlavaIvtpForConditionalGeneration, LlavaIvtpProcessor
from tiny_models import (
    IMAGE_TOKEN_ID,
    LLAVA_CHAT_TEMPLATE,
    TINY_CLIP_TEXT,
    make_images,
    tiny_image_processor,
    tiny_model,
    tiny_processor,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def clip_tokenizer():
    return open_clip.get_tokenizer("ViT-L-14-336")


def instruction_text(processor, outputs, row=0) -> str:
    ids = torch.as_tensor(outputs["input_ids"][row])[torch.as_tensor(outputs["instruction_mask"][row]).bool()]
    return processor.tokenizer.decode(ids)


def char_reference(question: str, clip_tokenizer) -> list[tuple[int, int]]:
    """Independent of the span bookkeeping, for ASCII text and a one-character-per-token LLM tokenizer: CLIP's
    tokens, decoded, spell the question's non-space characters lower-cased in order; the k-th of them belongs to the
    CLIP token that spells it, at sequence position index + 1."""
    pieces = [clip_tokenizer.decoder[i].replace("</w>", "") for i in clip_tokenizer.encode(question)]
    owner = [position + 1 for position, piece in enumerate(pieces) for _ in piece]
    solid = [character for character in question if not character.isspace()]
    assert "".join(pieces) == "".join(solid).lower()
    return [(owner[k], owner[k] + 1) for k in range(len(solid))]


QUESTIONS = [
    "What color is the dog?",
    "Is the  2nd dog's\ncolor brown, or BLACK?",
    "COUNT: 3 cats, 12 dogs - how many?!",
]


@pytest.mark.parametrize("question", QUESTIONS)
def test_single_prompt_marks_the_question_and_aligns_each_character(processor, clip_tokenizer, question):
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    out = processor(images=make_images(1), text=prompt, return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "instruction_mask", "clip_input_ids", "clip_token_spans"}
    ids, mask, spans = out["input_ids"][0], out["instruction_mask"][0].bool(), out["clip_token_spans"][0]
    # the question's characters, nothing else: not USER/ASSISTANT, not the image placeholders, not spaces
    assert instruction_text(processor, out) == "".join(c for c in question if not c.isspace())
    assert not bool((ids[mask] == IMAGE_TOKEN_ID).any()) and int((ids == IMAGE_TOKEN_ID).sum()) == 36
    torch.testing.assert_close(out["clip_input_ids"], clip_tokenizer([question]))
    assert spans[mask].tolist() == [list(pair) for pair in char_reference(question, clip_tokenizer)]
    assert spans[~mask].abs().sum() == 0


def test_processor_matches_stock_llava_processor_on_its_outputs(processor):
    stock = LlavaProcessor(
        tiny_image_processor(), tiny_tokenizer(), patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    images = make_images(2)
    prompts = ["USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nDescribe the scene in detail. ASSISTANT:"]
    ours = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    theirs = stock(images=images, text=prompts, padding=True, return_tensors="pt")
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value)


def test_padded_batch_rows_equal_each_prompt_alone(processor):
    questions = ["Where is the red ball?", "How many people are there in this picture, roughly?", "Why?"]
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    images = make_images(3)
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        for row, prompt in enumerate(prompts):
            alone = processor(images=[images[row]], text=prompt, return_tensors="pt")
            real = batch["attention_mask"][row].bool()
            for key in ("input_ids", "instruction_mask", "clip_token_spans"):
                assert torch.equal(batch[key][row][real], alone[key][0]), (side, key)
                assert batch[key][row][~real].abs().sum() == 0 or key == "input_ids"
            assert torch.equal(batch["clip_input_ids"][row], alone["clip_input_ids"][0])
    processor.tokenizer.padding_side = "left"


def test_lists_without_return_tensors_and_requested_offsets_are_kept(processor):
    out = processor(text=["USER: Hi there? ASSISTANT:", "USER: Name it. ASSISTANT:"], return_offsets_mapping=True)
    assert isinstance(out["instruction_mask"], list) and isinstance(out["instruction_mask"][0], list)
    assert [len(row) for row in out["instruction_mask"]] == [len(row) for row in out["input_ids"]]
    assert len(out["clip_input_ids"][1]) == 77 and "offset_mapping" in out
    assert "text_replacement_offsets" not in out


def test_instruction_location_rules(processor):
    # no USER marker: the whole prompt (minus the image) is the instruction
    out = processor(images=make_images(1), text="<image>\nWhat is this?", return_tensors="pt")
    assert instruction_text(processor, out) == "Whatisthis?"
    # several turns: the last user turn only; the earlier answer and question are not part of it
    prompt = "USER: <image>\nWhat is it? ASSISTANT: A dog. USER: And its color? ASSISTANT:"
    out = processor(images=make_images(1), text=prompt, return_tensors="pt")
    assert instruction_text(processor, out) == "Anditscolor?"
    # a training prompt: the answer after ASSISTANT: is never instruction, even when it repeats the question
    prompt = "USER: <image>\nSay dog. ASSISTANT: Say dog."
    out = processor(images=make_images(1), text=prompt, return_tensors="pt")
    mask = out["instruction_mask"][0].bool()
    assert instruction_text(processor, out) == "Saydog."
    assert int(mask.nonzero().max()) < len(out["input_ids"][0]) - len("ASSISTANT: Say dog.")
    # explicit instruction text and character spans
    out = processor(images=make_images(1), text="<image> Look closely. Which animal?", instruction="Which animal?", return_tensors="pt")
    assert instruction_text(processor, out) == "Whichanimal?"
    spans_out = processor(
        images=make_images(1), text="<image> Look closely. Which animal?", instruction_spans=[[(22, 35)]], return_tensors="pt"
    )
    assert torch.equal(spans_out["instruction_mask"], out["instruction_mask"])
    # custom conversation markers
    custom = tiny_processor(instruction_start="Q:", instruction_end="A:")
    out = custom(images=make_images(1), text="Q: <image>\nWho is it? A: Bob", return_tensors="pt")
    assert instruction_text(custom, out) == "Whoisit?"


def test_chat_template_single_and_batch(processor):
    images = make_images(2)
    first = [
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat. What is it?"}]},
        {"role": "user", "content": [{"type": "text", "text": "Its color,"}, {"type": "text", "text": "please?"}]},
    ]
    second = [{"role": "user", "content": [{"type": "image", "image": images[1]}, {"type": "text", "text": "Count them."}]}]
    single = processor.apply_chat_template(first, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt")
    assert instruction_text(processor, single) == "Itscolor,please?"
    prompt = processor.apply_chat_template(first, add_generation_prompt=True)
    direct = processor(images=[images[0]], text=prompt, return_tensors="pt")
    for key in ("input_ids", "instruction_mask", "clip_token_spans", "clip_input_ids"):
        assert torch.equal(single[key], direct[key]), key
    # the two text blocks are one CLIP text: "its color, please?"
    torch.testing.assert_close(single["clip_input_ids"], open_clip.get_tokenizer("ViT-L-14-336")(["Its color, please?"]))

    batch = processor.apply_chat_template(
        [first, second], tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert instruction_text(processor, batch, 0) == "Itscolor,please?"
    assert instruction_text(processor, batch, 1) == "Countthem."
    # a string content and a conversation whose last user turn is followed by the answer (training)
    trained = [
        {"role": "user", "content": "Say dog."},
        {"role": "assistant", "content": "Say dog."},
    ]
    out = processor.apply_chat_template(trained, tokenize=True, return_dict=True, return_tensors="pt")
    assert instruction_text(processor, out) == "Saydog."
    assert int(out["instruction_mask"][0].nonzero().max()) < len(out["input_ids"][0]) - len("ASSISTANT: Say dog. ")


def test_chat_templates_that_transform_the_text(processor):
    """A template that transforms the text as a whole (upper case) still marks exactly the rendered text; one that
    trims it cannot be located through the marks and is refused with a clear error."""
    upper = LLAVA_CHAT_TEMPLATE.replace("block['text'] + ' '", "block['text'] | upper + ' '")
    conversation = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}]}]
    out = processor.apply_chat_template(conversation, chat_template=upper, tokenize=True, return_dict=True)
    assert instruction_text(processor, out) == "WHATISIT?"
    trimming = LLAVA_CHAT_TEMPLATE.replace("block['text'] + ' '", "block['text'] | trim + ' '")
    conversation = [{"role": "user", "content": [{"type": "text", "text": "  What is it?  "}]}]
    with pytest.raises(ValueError, match="changes the user's text"):
        processor.apply_chat_template(conversation, chat_template=trimming, tokenize=True, return_dict=True)


def test_instructions_past_clips_77_tokens(processor, clip_tokenizer):
    """CLIP keeps 75 content tokens (start + 75 + end = 77): ids equal open_clip's truncation; LLM tokens of
    characters of the first 75 CLIP tokens point at positions 1-75; later ones get (0, 0) but stay in the instruction
    mask."""
    words = ["w" + "abcdefghijklmnopqrstuvwxyz"[i // 26] + "abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(90)]
    question = " ".join(words)
    assert len(clip_tokenizer.encode(question)) > 75
    out = processor(text=f"USER: {question} ASSISTANT:", return_tensors="pt")
    torch.testing.assert_close(out["clip_input_ids"], clip_tokenizer([question]))
    assert int(out["clip_input_ids"][0, 76]) == clip_tokenizer.eot_token_id
    mask, spans = out["instruction_mask"][0].bool(), out["clip_token_spans"][0]
    assert instruction_text(processor, out) == "".join(words)
    reference = [[start, end] if end <= 76 else [0, 0] for start, end in char_reference(question, clip_tokenizer)]
    assert spans[mask].tolist() == reference
    assert [0, 0] in reference and int(spans.max()) == 76


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(instruction="not in the prompt"), "instruction\\[0\\]"),
        (dict(instruction=["a", "b"]), "one entry per prompt"),
        (dict(instruction_spans=[[(0, 999)]]), "instruction_spans\\[0\\]"),
    ],
)
def test_bad_instruction_arguments_are_refused(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(text="USER: What? ASSISTANT:", **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(clip_model_name="ViT-Nope"), "clip_model_name"),
        (dict(clip_model_name="hf-hub:org/model"), "clip_model_name"),
        (dict(clip_model_name="ViT-SO400M-14-SigLIP"), "SigLIP"),
        (dict(instruction_start=""), "instruction_start"),
    ],
)
def test_bad_processor_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(**overrides)


def test_save_and_load(processor, tmp_path):
    custom = tiny_processor(instruction_start="Q:", instruction_end="A:")
    custom.save_pretrained(tmp_path)
    loaded = LlavaIvtpProcessor.from_pretrained(tmp_path)
    assert (loaded.clip_model_name, loaded.instruction_start, loaded.instruction_end) == ("ViT-L-14-336", "Q:", "A:")
    assert loaded.chat_template == LLAVA_CHAT_TEMPLATE
    text = "Q: <image>\nWho? A:"
    images = make_images(1)
    for key, value in custom(images=images, text=text, return_tensors="pt").items():
        torch.testing.assert_close(loaded(images=images, text=text, return_tensors="pt")[key], value)


# ---------------------------------------------------------------------------------------------------------------
# The model fed by the processors
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_model(clip_text_encoder=TINY_CLIP_TEXT, tau=0.0)


def test_model_prunes_with_the_processors_guidance(processor, model):
    prompts = ["USER: <image>\nWhat color is the dog? ASSISTANT:", "USER: <image>\nIs it 2nd? ASSISTANT:"]
    inputs = processor(images=make_images(2), text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    relevance = out.instruction_relevance
    has_clip = inputs["instruction_mask"].bool() & (inputs["clip_token_spans"][..., 1] > 0)
    assert bool(torch.isfinite(relevance[has_clip]).all()) and bool(torch.isnan(relevance[~has_clip]).all())
    selected = out.pseudo_cls_tokens
    assert bool((selected <= has_clip).all())
    assert torch.equal(selected, has_clip & (relevance >= model.config.tau))
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
    for row in range(2):
        alone = processor(images=[make_images(2)[row]], text=prompts[row], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
        assert torch.equal(generated[row, -6:], single[0, -6:])


def test_stock_processor_outputs_prune_with_the_visual_cls_and_warn_once(model, caplog):
    stock = LlavaProcessor(
        tiny_image_processor(), tiny_tokenizer(), patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    inputs = stock(images=make_images(1), text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    visual = LlavaIvtpForConditionalGeneration(model.config.__class__(**{**model.config.to_dict(), "guidance": "visual_cls"}))
    visual.load_state_dict(model.state_dict())
    logging.Logger.warning_once.cache_clear()  # the once-per-process cache: other tests may have warned already
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING), torch.no_grad():
            first = model(**inputs, use_cache=False)
            model(**inputs, use_cache=False)
            expected = visual.eval()(**inputs, use_cache=False)
    finally:
        hf_logging.disable_propagation()
    warnings = [record.message for record in caplog.records if "pseudo-CLS" in record.message]
    assert len(warnings) == 1 and "LlavaIvtpProcessor" in warnings[0] and "instruction_mask" in warnings[0]
    assert first.pseudo_cls_tokens is None
    torch.testing.assert_close(first.logits, expected.logits)
