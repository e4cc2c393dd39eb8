"""The masked training path: gradients flow where they should, and it agrees with inference."""

import torch

from dynamic_llava.attention import allowed_keys, masked_softmax_attention
from dynamic_llava.losses import budget_loss
from dynamic_llava.stats import ForwardRecord
from tiny import make_prompts, tiny_dynamic


def answer_mask_for(mask, last):
    """The last `last` real tokens of each sample are answer tokens."""
    answer = torch.zeros_like(mask, dtype=torch.bool)
    answer[:, -last:] = True
    return answer & mask.bool()


def test_gradients_reach_predictors_and_llm_not_the_frozen_vision_tower():
    model = tiny_dynamic().train()
    model.model.vision_tower.requires_grad_(False)
    ids, mask, pixels = make_prompts([3, 6], [8, 5], seed=1)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids,
                answer_mask=answer_mask_for(mask, 4), gumbel_tau=0.5)
    out.loss.backward()

    def grads(prefix):
        return [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]

    for prefix in ("model.language_model.image_predictor", "model.language_model.text_predictor",
                   "model.language_model.layers", "model.multi_modal_projector"):
        g = grads(prefix)
        assert g and all(x is not None for x in g), prefix
        assert sum(float(x.abs().sum()) for x in g) > 0, prefix
    assert all(x is None for x in grads("model.vision_tower"))
    assert out.image_keep_ratio.shape == (2,) and out.text_keep_ratio.shape == (2,)
    assert out.budget_loss > 0


def test_training_path_with_fixed_masks_equals_inference_physical_path():
    model = tiny_dynamic(image_keep_rate=0.25)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=2)
    with torch.no_grad():
        inference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        keep = torch.zeros_like(mask, dtype=torch.float32)
        keep.scatter_(1, inference.kept_index, inference.kept_valid.float())
        keep = torch.where(mask.bool(), keep, torch.ones_like(keep))  # padding: masked as keys anyway
        training = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids, keep_override=keep)
    index = inference.kept_index
    real = inference.kept_valid & mask.bool().gather(1, index)
    train_kept = training.logits.gather(1, index.unsqueeze(-1).expand(-1, -1, training.logits.shape[-1]))
    torch.testing.assert_close(train_kept[real], inference.logits[real], atol=1e-5, rtol=0)


def test_eval_mode_masks_are_the_inference_decisions():
    model = tiny_dynamic(image_keep_rate=0.25).eval()
    ids, mask, pixels = make_prompts([3, 6], [4, 2], seed=3)
    with torch.no_grad():
        inference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        training = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids)
    assert torch.equal(training.image_keep_ratio, torch.full((2,), 0.25))
    index = inference.kept_index
    real = inference.kept_valid & mask.bool().gather(1, index)
    train_kept = training.logits.gather(1, index.unsqueeze(-1).expand(-1, -1, training.logits.shape[-1]))
    torch.testing.assert_close(train_kept[real], inference.logits[real], atol=1e-5, rtol=0)


def test_masked_attention_with_hard_mask_equals_removing_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    keep = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
    out = masked_softmax_attention(q, k, v, allowed_keys(None, 1, 6, "cpu"), keep, scaling=0.5)
    for i in range(6):
        visible = [j for j in range(i + 1) if keep[0, j] == 1 or j == i]
        scores = (q[0, :, i] @ k[0, 0, visible].T) * 0.5
        expected = torch.softmax(scores, dim=-1) @ v[0, 0, visible]
        torch.testing.assert_close(out[0, i], expected, atol=1e-5, rtol=1e-5)


def test_budget_loss_matches_its_definition():
    record = ForwardRecord(
        image_tokens=torch.tensor([16, 0, 16]),
        image_keep_mean=torch.tensor([0.5, 0.0, 0.25]),
        text_tokens=torch.tensor([60, 0, 70]),
        text_keep_mean=torch.tensor([0.75, 0.0, 0.5]),
    )
    r_i = ((0.2 - 0.5) ** 2 + (0.2 - 0.25) ** 2) / 2  # samples with images only
    r_ot = ((0.5 - 0.75) ** 2 + (0.5 - 0.5) ** 2) / 3  # eligible samples, divided by the batch
    torch.testing.assert_close(budget_loss(record, 0.2, 0.5), torch.tensor(r_i + r_ot))
