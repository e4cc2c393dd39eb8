"""The LLaVA conversation data module: labels, image tokens, answer mask, malformed records, collation."""

import copy
import logging

import pytest
import torch
from tiny import IMAGE_TOKEN, PAD_TOKEN, tiny_dynamic
from tiny_processor import (
    BAD_RECORDS,
    GOOD_RECORDS,
    TOKENS_PER_IMAGE,
    tiny_processor,
    write_llava_dataset,
)
from transformers import AutoProcessor

from dynamic_llava.data import IGNORE_INDEX, LlavaCollator, LlavaConversationDataset


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_llava_dataset(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def dataset(processor, data_dir):
    return LlavaConversationDataset(*data_dir, processor)


def item(dataset, record_id):
    return dataset[dataset.ids.index(record_id)]


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    """The maximal runs of consecutive labelled tokens."""
    runs, previous = [], False
    for token in labels.tolist():
        if token != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = token != IGNORE_INDEX
    return runs


def test_processor_round_trips(processor, data_dir, tmp_path):
    tokenizer = processor.tokenizer
    assert len(tokenizer) <= 64 and tokenizer.pad_token_id == PAD_TOKEN and processor.image_token_id == IMAGE_TOKEN
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(processor) and loaded.chat_template == processor.chat_template
    a = LlavaConversationDataset(GOOD_RECORDS[:1], data_dir[1], loaded)[0]
    b = LlavaConversationDataset(GOOD_RECORDS[:1], data_dir[1], processor)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_labels_are_the_assistant_turns_and_their_end_token(processor, dataset):
    eos = processor.tokenizer.eos_token
    for record_id, record in zip(dataset.ids, dataset.records):
        sample = dataset[dataset.ids.index(record_id)]
        labels, ids = sample["labels"], sample["input_ids"]
        labelled = labels != IGNORE_INDEX
        assert torch.equal(labels[labelled], ids[labelled])
        assistant_texts = [t["value"] for t in record["conversations"] if t["from"] in ("gpt", "assistant")]
        decoded = [processor.tokenizer.decode(run) for run in labelled_runs(labels)]
        assert decoded == [text + eos for text in assistant_texts], record_id
        assert not labelled[ids == IMAGE_TOKEN].any()
        assert not labelled[0]  # BOS


# The chat template of the llava-hf LLaVA-1.5 checkpoints: images first, no end-of-sequence after answers.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_labels_with_the_llava_hf_template(processor, data_dir):
    """Another template: the answers are labelled without the separator space (no end token to label)."""
    dataset = LlavaConversationDataset(*data_dir, processor, chat_template=LLAVA_HF_TEMPLATE)
    for record in dataset.records:
        sample = dataset[dataset.ids.index(record["id"])]
        n_images = len(record["image"]) if isinstance(record.get("image"), list) else int("image" in record)
        assert sample["input_ids"].tolist().count(IMAGE_TOKEN) == TOKENS_PER_IMAGE * n_images
        decoded = [processor.tokenizer.decode(run) for run in labelled_runs(sample["labels"])]
        assert decoded == [t["value"] for t in record["conversations"] if t["from"] in ("gpt", "assistant")]


def test_system_and_user_text_never_labelled(processor, dataset):
    sample = item(dataset, "text")
    unlabelled = sample["input_ids"][sample["labels"] == IGNORE_INDEX]
    text = processor.tokenizer.decode(unlabelled)
    assert "a chat between a curious user and an assistant." in text and "is the cat red?" in text


def test_image_tokens_per_image(dataset):
    for record_id, n_images in [("single", 1), ("multi", 1), ("long", 1), ("two_images", 2), ("text", 0)]:
        sample = item(dataset, record_id)
        assert int((sample["input_ids"] == IMAGE_TOKEN).sum()) == TOKENS_PER_IMAGE * n_images
        if n_images:
            assert sample["pixel_values"].shape == (n_images, 3, 32, 32)
        else:
            assert "pixel_values" not in sample


def test_answer_mask_long_last_answer_only(processor, data_dir):
    dataset = LlavaConversationDataset(*data_dir, processor, min_answer_tokens=50)
    long = item(dataset, "long")
    assert int(long["answer_mask"].sum()) >= 50
    assert torch.equal(long["answer_mask"], long["labels"] != IGNORE_INDEX)  # one turn: all its labels
    for record_id in ("single", "multi", "text", "two_images"):  # answers shorter than 50 tokens keep everything
        assert not item(dataset, record_id)["answer_mask"].any()

    multi = item(LlavaConversationDataset(*data_dir, processor, min_answer_tokens=1), "multi")
    marked = multi["input_ids"][multi["answer_mask"]]
    assert processor.tokenizer.decode(marked) == "yes, there is one cat." + processor.tokenizer.eos_token
    runs = labelled_runs(multi["labels"])
    assert marked.tolist() == runs[-1] and len(runs) == 2


def test_bad_records_are_skipped_and_reported(processor, data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = LlavaConversationDataset(*data_dir, processor)
    assert dataset.ids == [r["id"] for r in GOOD_RECORDS]
    reasons = dict(dataset.skipped)
    assert reasons.keys() == BAD_RECORDS.keys()
    assert "not found" in reasons["missing_file"] and "nope.png" in reasons["missing_file"]
    assert "<image>" in reasons["no_placeholder"]
    assert "empty" in reasons["empty"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 8" in warnings[0] and all(k in warnings[0] for k in BAD_RECORDS)


@pytest.mark.parametrize("bad_id", list(BAD_RECORDS))
def test_bad_record_refused_with_raise(processor, data_dir, bad_id):
    records = GOOD_RECORDS + [BAD_RECORDS[bad_id]]
    with pytest.raises(ValueError, match=f"record '{bad_id}'"):
        LlavaConversationDataset(records, data_dir[1], processor, on_error="raise")


@pytest.mark.parametrize(
    "conversations, reason",
    [
        ([{"from": "gpt", "value": "a cat."}], "alternate"),
        ([{"from": "human", "value": "<image>\nwhat?"}], "alternate"),
        ([{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "<image>"}], "outside a human"),
        ([{"from": "robot", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a cat."}], "turn 0"),
    ],
)
def test_malformed_conversations(processor, data_dir, conversations, reason):
    record = {"id": "x", "image": "a.png", "conversations": conversations}
    with pytest.raises(ValueError, match=f"record 'x': .*{reason}"):
        LlavaConversationDataset([record], data_dir[1], processor, on_error="raise")


def test_all_bad_is_refused(processor, data_dir):
    with pytest.raises(ValueError, match="no usable record"):
        LlavaConversationDataset(list(BAD_RECORDS.values()), data_dir[1], processor)


def test_max_length_refuses_instead_of_truncating(processor, data_dir, dataset):
    lengths = {rid: len(dataset[i]["input_ids"]) for i, rid in enumerate(dataset.ids)}
    limit = lengths["long"]
    assert LlavaConversationDataset(GOOD_RECORDS, data_dir[1], processor, max_length=limit).skipped == []
    shorter = LlavaConversationDataset(GOOD_RECORDS, data_dir[1], processor, max_length=limit - 1)
    assert [rid for rid, _ in shorter.skipped] == ["long"] and "max_length" in shorter.skipped[0][1]
    fits = LlavaConversationDataset(GOOD_RECORDS, data_dir[1], processor, max_length=lengths["two_images"])
    assert {rid for rid, _ in fits.skipped} == {rid for rid, n in lengths.items() if n > lengths["two_images"]}


def test_unreadable_image_named_when_encoded(processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    record = copy.deepcopy(GOOD_RECORDS[0]) | {"id": "broken", "image": "broken.png"}
    dataset = LlavaConversationDataset([record], tmp_path, processor)
    with pytest.raises(ValueError, match="record 'broken': cannot read image"):
        dataset[0]


def test_on_error_value_checked(processor, data_dir):
    with pytest.raises(ValueError, match="on_error"):
        LlavaConversationDataset(*data_dir, processor, on_error="ignore")


def test_collator_right_pads(dataset):
    samples = [item(dataset, rid) for rid in ("long", "text", "two_images")]
    batch = LlavaCollator(PAD_TOKEN)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "answer_mask", "pixel_values"}
    width = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == (3, width)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        pads = {"input_ids": PAD_TOKEN, "attention_mask": 0, "labels": IGNORE_INDEX, "answer_mask": False}
        for key, pad in pads.items():
            assert torch.equal(batch[key][row, :n], sample[key])
            assert (batch[key][row, n:] == pad).all()
    assert batch["answer_mask"].dtype == torch.bool
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0]["pixel_values"], samples[2]["pixel_values"]]))
    assert "pixel_values" not in LlavaCollator(PAD_TOKEN)([item(dataset, "text")])


def test_batch_runs_through_tiny_model(dataset):
    batch = LlavaCollator(PAD_TOKEN)([item(dataset, rid) for rid in ("single", "text", "two_images", "long")])
    model = tiny_dynamic()
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
    assert out.logits.shape[0] == 4 and out.logits.shape[-1] == 64
    assert torch.isfinite(out.logits).all()
