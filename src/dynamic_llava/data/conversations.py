"""LLaVA conversation data (the `llava_v1_5_mix665k.json` format) turned into llava-hf training inputs.

A record is ``{"id": ..., "image": "rel/path.png" | [paths] (optional), "conversations": [{"from": "human",
"value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}``. Each record becomes messages in
the transformers multimodal chat format, is rendered with the processor's chat template and encoded by the
processor itself (which expands each ``<image>`` into the model's number of image tokens), so the token layout
is exactly what the model sees at inference.

Labels cover the assistant turns only: their content and whatever the template renders after it up to the
next turn (the end-of-turn token). They are found by rendering the prefix before each assistant turn (with the
generation prompt) and the prefix including it: the characters in between are that turn, mapped to tokens with
the fast tokenizer's offsets, shifted by the processor's image-placeholder expansion. ``answer_mask`` marks the
tokens of the last assistant turn when it is long enough (the output-text tokens Dynamic-LLaVA may drop).

Records are validated when the dataset is built, so a malformed one is reported by id (skipped or refused)
instead of failing later inside a batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import LlavaProcessor
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# The LLaVA-1.5 training format ("USER: <image>\nQ ASSISTANT: A</s>USER: ..."), whose prompt is the one llava-hf
# models are queried with. The chat template shipped with llava-hf LLaVA-1.5 checkpoints puts no end-of-sequence
# token after assistant turns, so training with it would never teach the model to stop: pass this one instead.
LLAVA_V1_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{{ ' ' }}"
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


IMAGE_EXTRAS = ("image_sizes", "image_grid_thw")  # per-image tensors some processors return with pixel_values


class LlavaConversationDataset(Dataset):
    """LLaVA conversation records + an image folder -> dicts of tensors for `LlavaCollator`.

    Args:
        json_path_or_records: a JSON file holding a list of records, or the list itself.
        image_folder: the folder that record ``image`` paths are relative to.
        processor: the model's processor (a `LlavaProcessor` with a fast tokenizer).
        min_answer_tokens: the last assistant turn is marked in ``answer_mask`` only if it has at least this
            many label tokens (content + end token); the paper's LEN_OT, 50 for LLaVA data.
        on_error: ``"skip"`` leaves bad records out (listed in ``self.skipped`` and in one warning), ``"raise"``
            raises ValueError naming the first bad record's id.
        max_length: refuse (as a bad record) any sample longer than this many tokens: truncating would cut
            through image tokens or the answer. Checking it renders and tokenizes every record at construction.
        chat_template: overrides the processor's chat template (e.g. `LLAVA_V1_CHAT_TEMPLATE`).

    Item keys: ``input_ids``, ``labels``, ``attention_mask`` [N] long, ``answer_mask`` [N] bool and, for records
    with images, ``pixel_values`` [n_images, 3, H, W]. An image that exists but cannot be read is only found when
    its item is encoded: it is then skipped like any bad record (reported by id), or raises under ``"raise"``.

    Attributes: ``records`` and ``ids`` (the usable records and their ids, in file order; a record without an id is
    named ``#<index in the file>``) and ``skipped`` ((id, reason) of each record left out).
    """

    def __init__(
        self,
        json_path_or_records: str | os.PathLike | list[dict],
        image_folder: str | os.PathLike,
        processor,
        *,
        min_answer_tokens: int = 50,
        on_error: str = "skip",
        max_length: int | None = None,
        chat_template: str | None = None,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not getattr(processor.tokenizer, "is_fast", False):
            raise ValueError("LlavaConversationDataset needs a fast tokenizer (it maps labels through token offsets).")
        source = "the records given"
        if isinstance(json_path_or_records, (str, os.PathLike)):
            source = str(json_path_or_records)
            try:
                with open(json_path_or_records, encoding="utf-8") as f:
                    json_path_or_records = json.load(f)
            except ValueError as error:  # invalid JSON or not UTF-8
                raise ValueError(f"{source} is not a JSON file of LLaVA records: {error}") from error
        if not isinstance(json_path_or_records, list):
            raise ValueError(
                f"{source}: expected a list of records, got {type(json_path_or_records).__name__}"
            )
        self.image_folder = Path(image_folder)
        self.processor = processor
        self.min_answer_tokens = min_answer_tokens
        self.max_length = max_length
        self.chat_template = chat_template
        self.on_error = on_error
        self._check_template()
        self._unusable: set[int] = set()  # records found bad only when encoded (unreadable image, too long)
        self.records: list[dict] = []
        self.ids: list[object] = []
        self.skipped: list[tuple[object, str]] = []
        for index, record in enumerate(json_path_or_records):
            record_id = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
            reason = self._problem(record)
            if reason is None:
                self.records.append(record)
                self.ids.append(record_id)
            elif on_error == "raise":
                raise ValueError(f"record {record_id!r}: {reason}")
            else:
                self.skipped.append((record_id, reason))
        if self.skipped:
            first = "; ".join(f"{rid!r}: {why}" for rid, why in self.skipped[:5])
            message = f"{len(self.skipped)} of {len(json_path_or_records)} records are malformed (first: {first})"
            if not self.records:
                raise ValueError(f"no usable record: {message}")
            logger.warning(f"Skipping {message}")
        elif not self.records:
            raise ValueError("no records given")

    def __len__(self) -> int:
        return len(self.records)

    def _check_template(self) -> None:
        """Refuse a chat template that fails or writes no turn text, before any record is judged by it."""
        probe = [
            {"role": "user", "content": [{"type": "text", "text": "probe question"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "probe answer"}]},
        ]
        try:
            text = self._render(probe)
        except Exception as error:  # Jinja raises several types; all mean "this template cannot be used"
            raise ValueError(f"the chat template cannot render a conversation: {error}") from error
        if "probe question" not in text or "probe answer" not in text:
            raise ValueError(
                f"the chat template renders no conversation turns (a test conversation became {text[:80]!r}): "
                "pass a template that writes each message's content, or 'llava_v1'"
            )

    def _image_paths(self, record: dict) -> list[Path]:
        """The record's image files (``image`` is one path, a list of paths, or absent for text-only records)."""
        images = record.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else images
        return [self.image_folder / p for p in images]

    def _problem(self, record) -> str | None:
        """Why ``record`` cannot be used (None if it can), from checks that need no image decoding."""
        if not isinstance(record, dict):
            return f"a record must be a dict, got {type(record).__name__}"
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            return "conversations is missing or empty"
        roles = []
        for k, turn in enumerate(turns):
            if not (isinstance(turn, dict) and isinstance(turn.get("value"), str) and turn.get("from") in ROLES):
                return f"turn {k} is not {{'from': one of {sorted(ROLES)}, 'value': text}}"
            roles.append(ROLES[turn["from"]])
        dialogue = roles[1:] if roles[0] == "system" else roles
        if not dialogue or dialogue != ["user", "assistant"] * (len(dialogue) // 2):
            return f"roles {roles} do not alternate human/gpt, from human (after an optional system turn) to gpt"
        empty = [k for k, (t, r) in enumerate(zip(turns, roles)) if r == "assistant" and not t["value"].strip()]
        if empty:
            return f"turn {empty[0]} (gpt) is an empty answer"
        if any(IMAGE_PLACEHOLDER in t["value"] for t, r in zip(turns, roles) if r != "user"):
            return f"{IMAGE_PLACEHOLDER!r} appears outside a human turn"
        images = record.get("image")
        if images is not None and not (
            isinstance(images, str) or (isinstance(images, list) and all(isinstance(p, str) for p in images))
        ):
            return "image must be a path or a list of paths"
        paths = self._image_paths(record)
        placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
        if placeholders != len(paths):
            return f"{placeholders} {IMAGE_PLACEHOLDER!r} placeholder(s) for {len(paths)} image(s)"
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            return f"image file not found: {', '.join(missing)}"
        if self.max_length is not None:
            n_tokens = self._estimate_length(record, len(paths))
            if n_tokens > self.max_length:
                return f"{n_tokens} tokens > max_length={self.max_length}"
        return None

    def _estimate_length(self, record: dict, n_images: int) -> int:
        """Token count of the encoded record without loading its images.

        Exact for LLaVA-1.5 processors, whose images all become the same number of tokens (the crop size's); for
        processors whose token count depends on the image (LLaVA-NeXT, Qwen-VL) the sizes are read from the
        image files' headers.
        """
        text = self._render(self._messages(record))
        n_text = len(self.processor.tokenizer(text, add_special_tokens=self._add_special_tokens(text))["input_ids"])
        if not n_images:
            return n_text
        if isinstance(self.processor, LlavaProcessor):  # every image becomes the crop size's tokens
            crop = self.processor.image_processor.crop_size
            per_image = self.processor._get_num_multimodal_tokens(image_sizes=[(crop["height"], crop["width"])])
            return n_text + n_images * (per_image.num_image_tokens[0] - 1)
        sizes = []
        for path in self._image_paths(record):
            try:
                with Image.open(path) as image:
                    sizes.append((image.height, image.width))
            except Exception:  # unreadable: found (and reported) when the record is encoded
                return n_text
        counts = self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
        return n_text + sum(c - 1 for c in counts)

    @staticmethod
    def _messages(record: dict) -> list[dict]:
        """Transformers chat messages; images go where the ``<image>`` placeholders were in the human text."""
        messages = []
        for turn in record["conversations"]:
            role = ROLES[turn["from"]]
            if role == "user":
                content = []
                for k, piece in enumerate(turn["value"].split(IMAGE_PLACEHOLDER)):
                    if k:
                        content.append({"type": "image"})
                    if piece.strip():
                        content.append({"type": "text", "text": piece.strip()})
            else:
                content = [{"type": "text", "text": turn["value"]}]
            messages.append({"role": role, "content": content})
        return messages

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (placeholders not yet expanded: the processor does that)."""
        return self.processor.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _add_special_tokens(self, text: str) -> bool:
        """Let the tokenizer add BOS unless the template already wrote it (as the processor's own chat path does)."""
        bos = self.processor.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def _assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in ``text``: content + what follows it up to the next turn."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "the chat template does not render a conversation's prefixes as prefixes of the whole "
                    "conversation, so assistant turns cannot be located: use another chat_template"
                )
            # Whitespace ending a turn separates it from the next one, whose first token may absorb it: not a label.
            spans.append((len(before), len(through.rstrip())))
        return spans

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Record ``i`` encoded. Under ``on_error="skip"`` a record found bad only now (an unreadable image, more
        tokens than ``max_length``) is reported by id and the next usable record is given in its place, the same
        way on every pass and restart; under ``"raise"`` it raises ValueError naming it."""
        if self.on_error == "raise":
            return self._encode(i)
        first = None
        for offset in range(len(self.records)):
            j = (i + offset) % len(self.records)
            if j in self._unusable:
                continue
            try:
                return self._encode(j)
            except _BadRecord as error:
                first = first or error
                self._unusable.add(j)
                self.skipped.append((self.ids[j], error.reason))
                logger.warning(
                    f"Skipping record {self.ids[j]!r}: {error.reason} (the next usable record takes its place)"
                )
        raise ValueError(f"{first or 'every record failed when encoded'}; no usable record is left")

    def _encode(self, i: int) -> dict[str, torch.Tensor]:
        record, record_id = self.records[i], self.ids[i]
        images = []
        for path in self._image_paths(record):
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except Exception as e:  # PIL raises several types; all mean "this file is not a usable image"
                raise _BadRecord(record_id, f"cannot read image {path}: {e}") from e
        messages = self._messages(record)
        text = self._render(messages)
        encoded = self.processor(
            text=text,
            images=images or None,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            add_special_tokens=self._add_special_tokens(text),
        )
        input_ids = encoded["input_ids"][0]
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise _BadRecord(record_id, f"{len(input_ids)} tokens > max_length={self.max_length}")
        # Offsets refer to the text after image expansion; shift the spans by the characters that expansion added.
        replacements = encoded["text_replacement_offsets"][0]
        token_start, token_end = encoded["offset_mapping"][0].unbind(-1)
        turn_masks = []
        for start, end in self._assistant_spans(messages, text):
            shift = sum(len(r["replacement"]) - len(r["text"]) for r in replacements if r["span"][1] <= start)
            turn_masks.append((token_start < end + shift) & (token_end > start + shift))
        labelled = torch.stack(turn_masks).any(0)
        last = turn_masks[-1]
        item = {
            "input_ids": input_ids,
            "attention_mask": encoded["attention_mask"][0],
            "labels": torch.where(labelled, input_ids, IGNORE_INDEX),
            "answer_mask": last if int(last.sum()) >= self.min_answer_tokens else torch.zeros_like(last),
        }
        if images:
            item["pixel_values"] = encoded["pixel_values"]
            for key in IMAGE_EXTRAS:  # LLaVA-NeXT's image sizes, Qwen-VL's patch grids
                if key in encoded:
                    item[key] = encoded[key]
        if "mm_token_type_ids" in encoded:  # Qwen-VL: which tokens are image tokens (for its 3-D positions)
            item["mm_token_type_ids"] = encoded["mm_token_type_ids"][0]
        return item


class _BadRecord(ValueError):
    """A record found unusable only when encoded; the message names it."""

    def __init__(self, record_id, reason: str):
        super().__init__(f"record {record_id!r}: {reason}")
        self.reason = reason


class LlavaCollator:
    """Right-pads dataset items into a training batch.

    ``input_ids`` with ``pad_token_id``, ``labels`` with -100, ``attention_mask`` with 0, ``answer_mask`` with
    False; ``pixel_values`` are the images of the samples that have some, in batch order (the model matches them
    to image tokens in order), and the key is left out when no sample has an image.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        def pad(key, value):
            return torch.nn.utils.rnn.pad_sequence([s[key] for s in samples], batch_first=True, padding_value=value)

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "answer_mask": pad("answer_mask", False),
        }
        if all("mm_token_type_ids" in s for s in samples):
            batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
        pixels = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if pixels:
            if pixels[0].ndim == 5:  # LLaVA-NeXT: [images, tiles, C, H, W], padded to the most tiles
                tiles = max(p.shape[1] for p in pixels)
                pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixels]
            batch["pixel_values"] = torch.cat(pixels)
            for key in IMAGE_EXTRAS:
                values = [s[key] for s in samples if s.get(key) is not None]
                if values:
                    batch[key] = torch.cat(values)
        return batch
