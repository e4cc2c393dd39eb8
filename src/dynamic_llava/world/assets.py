"""The world's tokenizer (trained with `tokenizers`) and llava-hf processor, saved with its models."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from ..data import LLAVA_V1_CHAT_TEMPLATE
from .scenes import corpus

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 0, 1, 2, 3


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's words (one token per word or punctuation mark), BOS added."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


def llava_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    """A LLaVA-1.5-layout processor: CLIP-style images at `image_size` px, the CLS token dropped, so one image
    becomes (image_size / patch_size)^2 tokens; answers end with the end token (LLaVA v1 chat template)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_V1_CHAT_TEMPLATE,
    )


def build_processor(image_size: int = 96, patch_size: int = 12) -> LlavaProcessor:
    """The world's processor: its tokenizer, 96 px images, 64 image tokens."""
    return llava_processor(build_tokenizer(), image_size, patch_size)


WORLD_FILE = "world.json"  # beside a world checkpoint's weights: the generator settings it was trained on


def write_world_settings(folder, clutter: int) -> None:
    """Record in a world checkpoint the world it was trained in, so that evaluations draw scenes from it."""
    (Path(folder) / WORLD_FILE).write_text(json.dumps({"clutter": clutter}))


def world_clutter(folder) -> int:
    """The `clutter` setting of the world a checkpoint was trained in (0, the plain world, if it records none)."""
    path = Path(folder) / WORLD_FILE
    return int(json.loads(path.read_text()).get("clutter", 0)) if path.is_file() else 0


def check_same_world(checkpoint, baseline, baseline_name: str = "the baseline") -> int:
    """The clutter of `checkpoint`'s world; ValueError if the dense `baseline` was trained in another (None: no
    baseline, nothing to compare). `baseline_name` names it in the message (a CLI passes its option)."""
    clutter = world_clutter(checkpoint)
    if baseline is not None and (other := world_clutter(baseline)) != clutter:
        raise ValueError(f"{checkpoint} and {baseline} were trained in different worlds (clutter {clutter} and "
                         f"{other}): pass the dense model of the same world build as {baseline_name}.")
    return clutter


__all__ = ["WORLD_FILE", "build_processor", "check_same_world", "world_clutter", "write_world_settings",
           "build_tokenizer", "llava_processor", "PAD_ID", "BOS_ID", "EOS_ID", "IMAGE_ID"]
