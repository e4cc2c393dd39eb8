"""A small but real llava-hf processor and a LLaVA-format data set on disk, built in-process (no downloads).

The tokenizer is a BPE trained on a few sentences with a sentencepiece-style `Metaspace` pre-tokenizer, so it
decodes back to the exact text (what the label tests rely on). Its ids fit the tiny models of `tiny.py`:
``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<image>`` 3, ``<unk>`` 4, at most 64 tokens in all. The processor expands
``<image>`` into (32/8)^2 = 16 image tokens, as `tiny_config_kwargs()`' vision tower produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tiny import IMAGE_TOKEN, PAD_TOKEN, VOCAB
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from dynamic_llava.world.assets import llava_processor

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
IMAGE_SIZE, PATCH = 32, 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2

# Every character the test data uses appears here, so nothing encodes to <unk>.
CORPUS = [
    "USER: ASSISTANT: a chat between a curious user and an assistant.",
    "what is in the picture? describe the image in detail, please!",
    "the red cat sits on the blue mat.\nthe dog runs in the park.",
    "is there a dog? yes, there is one dog and one cat.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # BOS, as Llama
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        clean_up_tokenization_spaces=False,
    )
    assert tokenizer.pad_token_id == PAD_TOKEN and tokenizer.image_token_id == IMAGE_TOKEN and len(tokenizer) <= VOCAB
    return tokenizer


def without_video_processor(processor_class: type) -> type:
    """`processor_class` (a stock processor of a family that also takes videos) without its video processor, which
    needs torchvision (not installed here): images and text go through the stock code unchanged."""

    class ImageOnly(processor_class):
        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def tiny_processor() -> LlavaProcessor:
    """LLaVA-1.5 layout: CLIP drops its CLS token ("default" strategy), so an image is (32/8)^2 tokens."""
    return llava_processor(tiny_tokenizer(), IMAGE_SIZE, PATCH)


LONG_ANSWER = " ".join(["the red cat sits on the blue mat, and the dog runs in the park."] * 3)

GOOD_RECORDS = [
    {
        "id": "single",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture?"},
            {"from": "gpt", "value": "a red cat."},
        ],
    },
    {
        "id": "multi",
        "image": "b.png",
        "conversations": [
            {"from": "human", "value": "is there a dog?\n<image>"},
            {"from": "gpt", "value": "yes, there is one dog."},
            {"from": "human", "value": "is there a cat?"},
            {"from": "gpt", "value": "yes, there is one cat."},
        ],
    },
    {
        "id": "long",
        "image": "sub/c.png",
        "conversations": [
            {"from": "human", "value": "<image>\ndescribe the image in detail, please!"},
            {"from": "gpt", "value": LONG_ANSWER},
        ],
    },
    {
        "id": "text",
        "conversations": [
            {"from": "system", "value": "a chat between a curious user and an assistant."},
            {"from": "user", "value": "is the cat red?"},
            {"from": "assistant", "value": "yes, the cat is red."},
        ],
    },
    {
        "id": "two_images",
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nis there a dog in the picture?"},
            {"from": "gpt", "value": "yes."},
        ],
    },
]

BAD_RECORDS = {
    "missing_file": {
        "id": "missing_file",
        "image": "nope.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a cat."}],
    },
    "no_placeholder": {
        "id": "no_placeholder",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "a cat."}],
    },
    "empty": {"id": "empty", "image": "a.png", "conversations": []},
}


def write_images(folder: Path) -> None:
    """The images GOOD_RECORDS name: random RGB PNGs of assorted sizes (the processor resizes and crops)."""
    rng = np.random.default_rng(0)
    for name, size in [("a.png", (32, 32)), ("b.png", (40, 56)), ("sub/c.png", (64, 48))]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)


def write_llava_dataset(root: Path, bad: bool = True) -> tuple[Path, Path]:
    """Write ``root/data.json`` (GOOD_RECORDS, then BAD_RECORDS if ``bad``) and ``root/images``; return both paths."""
    folder = root / "images"
    write_images(folder)
    records = GOOD_RECORDS + (list(BAD_RECORDS.values()) if bad else [])
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path, folder
