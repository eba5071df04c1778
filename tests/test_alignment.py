"""LLM <-> CLIP token alignment (eq. 7) on hard text, with open_clip's own tokenizer and a Llama-style (Metaspace
BPE) tokenizer trained here, offline."""

import open_clip
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_llava_ivtp.guidance_ivtp import align_llm_to_clip, clip_tokens_with_spans


CORPUS = [
    "What color is the dog? The dog is brown.",
    "antidisestablishmentarianism antidisestablishmentarianism antidisestablishmentarianism",
    "The year 2024 and 314 apples.",
    "Describe the image in detail.",
] * 20


@pytest.fixture(scope="module")
def clip_tokenizer():
    return open_clip.get_tokenizer("ViT-L-14-336")


def build_llm_tokenizer():
    """Metaspace + BPE like Llama's; words of the corpus become single tokens, others split into pieces."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!'-\n\u2581éïßç東京ΣΟΦΊΑ")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def llm_tokenizer():
    return build_llm_tokenizer()


def alignment(text, llm_tokenizer, clip_tokenizer, context_length=77):
    encoded = llm_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    clip_ids, clip_spans = clip_tokens_with_spans(clip_tokenizer, text)
    ranges = align_llm_to_clip(encoded["offset_mapping"], clip_spans, text, 1, min(len(clip_ids), context_length - 2))
    llm_tokens = llm_tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    clip_tokens = [clip_tokenizer.decoder[i].replace("</w>", "") for i in clip_ids]
    return [(token, clip_tokens[start - 1 : end - 1]) for token, (start, end) in zip(llm_tokens, ranges)]


def brute_force(text, llm_tokenizer, clip_tokenizer):
    """Independent of `align_llm_to_clip`: character sets of both tokens, intersected."""
    encoded = llm_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    _, clip_spans = clip_tokens_with_spans(clip_tokenizer, text)
    result = []
    for start, end in encoded["offset_mapping"]:
        mine = {i for i in range(start, end) if not text[i].isspace()}
        result.append([k for k, (a, b) in enumerate(clip_spans) if mine & set(range(a, b))])
    return result


HARD_TEXTS = [
    "What COLOR is the Dog?",                           # capitals: CLIP lower-cases
    "the dog!!! (really), it's 'brown'.",              # punctuation runs, quotes, contraction
    "The year 2024 and 314 apples.",                   # digits: CLIP splits each digit
    "antidisestablishmentarianism",                    # one LLM token, several CLIP tokens
    "unbelievably",                                    # several LLM tokens, one CLIP token
    "the   dog\n\nis  brown",                          # repeated spaces, newlines
    "Straße café naïve 東京 ΣΟΦΊΑ",                     # non-ASCII, multi-byte CLIP pieces
]


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_clip_ids_and_spans_follow_open_clip(text, clip_tokenizer):
    ids, spans = clip_tokens_with_spans(clip_tokenizer, text)
    assert ids == clip_tokenizer.encode(text)
    for token_id, (start, end) in zip(ids, spans):
        piece = clip_tokenizer.decode([token_id]).strip()
        source = text[start:end].lower()
        assert piece in source or source in piece or "\ufffd" in piece, (piece, source)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_alignment_equals_character_overlap(text, llm_tokenizer, clip_tokenizer):
    encoded = llm_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    _, clip_spans = clip_tokens_with_spans(clip_tokenizer, text)
    ranges = align_llm_to_clip(encoded["offset_mapping"], clip_spans, text)
    for (start, end), expected in zip(ranges, brute_force(text, llm_tokenizer, clip_tokenizer)):
        assert list(range(start - 1, end - 1)) == expected


def test_hand_written_cases(llm_tokenizer, clip_tokenizer):
    capitals = dict(alignment("What COLOR is the Dog?", llm_tokenizer, clip_tokenizer))
    assert capitals["\u2581What"] == ["what"] and capitals["\u2581is"] == ["is"] and capitals["?"] == ["?"]
    pieces = alignment("What COLOR is the Dog?", llm_tokenizer, clip_tokenizer)
    color = [clips for token, clips in pieces if token in ("C", "O", "L", "R")]
    dog = [clips for token, clips in pieces if token in ("D", "og")]
    assert len(color) == 5 and all(clips == ["color"] for clips in color)  # 5 LLM pieces -> 1 CLIP token
    assert len(dog) == 2 and all(clips == ["dog"] for clips in dog)

    one_to_many = alignment("antidisestablishmentarianism", llm_tokenizer, clip_tokenizer)
    assert one_to_many == [("\u2581antidisestablishmentarianism", ["anti", "dise", "stab", "lish", "ment", "arianism"])]

    many_to_one = alignment("unbelievably", llm_tokenizer, clip_tokenizer)
    assert len(many_to_one) > 1 and all(clips == ["unbelievably"] for _, clips in many_to_one)

    digits = dict(alignment("The year 2024", llm_tokenizer, clip_tokenizer))
    assert digits["\u25812024"] == ["2", "0", "2", "4"]  # one LLM token, one CLIP token per digit

    spaced = alignment("the   dog\n\nis", llm_tokenizer, clip_tokenizer)
    assert [clips for token, clips in spaced if token.strip("\u2581\n") == ""] == [[]] * sum(
        1 for token, _ in spaced if token.strip("\u2581\n") == ""
    )  # whitespace-only tokens overlap no CLIP token
    assert [clips for _, clips in spaced if clips] == [["the"], ["dog"], ["is"]]

    accents = dict(alignment("café", llm_tokenizer, clip_tokenizer))
    assert all(clips == ["cafÃ©"] for clips in accents.values())


def test_past_clips_context_tokens_get_no_clip_tokens(llm_tokenizer, clip_tokenizer):
    """CLIP keeps 75 content tokens (77 with start and end); LLM tokens whose text lies past them get (0, 0) and
    so no relevance: eq. 8 leaves them out."""
    text = " ".join(["dog"] * 100)
    encoded = llm_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    clip_ids, clip_spans = clip_tokens_with_spans(clip_tokenizer, text)
    assert len(clip_ids) == 100
    ranges = align_llm_to_clip(encoded["offset_mapping"], clip_spans, text, 1, 75)
    words = [r for r, token in zip(ranges, llm_tokenizer.convert_ids_to_tokens(encoded["input_ids"])) if "dog" in token]
    assert len(words) == 100
    assert words[:75] == [(k + 1, k + 2) for k in range(75)]
    assert words[75:] == [(0, 0)] * 25
