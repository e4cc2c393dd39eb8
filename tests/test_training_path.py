"""The masked training path: gradients flow where they should, and it agrees with inference."""

import torch

from dynamic_llava.attention import allowed_keys, masked_softmax_attention
from dynamic_llava.losses import balance_mask_gradient, budget_loss, per_answer_loss
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


def test_eval_mode_masks_are_the_inference_decisions_under_diverse_selection():
    model = tiny_dynamic(image_keep_rate=0.25, image_selection="diverse").eval()
    ids, mask, pixels = make_prompts([3, 6], [4, 2], seed=3)
    with torch.no_grad():
        inference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        training = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids)
    assert torch.equal(training.image_keep_ratio, torch.full((2,), 0.25))
    real = inference.kept_valid & mask.bool().gather(1, inference.kept_index)
    train_kept = training.logits.gather(1, inference.kept_index.unsqueeze(-1).expand(-1, -1, training.logits.shape[-1]))
    torch.testing.assert_close(train_kept[real], inference.logits[real], atol=1e-5, rtol=0)


def test_top_share_sampling_keeps_the_inference_count_and_its_gradient_reaches_the_image_predictor():
    model = tiny_dynamic(image_keep_rate=0.25, image_mask_sampling="top_share").train()
    ids, mask, pixels = make_prompts([3, 6], [8, 5], seed=4)
    ratios = []
    for _ in range(3):  # noisy: which tokens varies from draw to draw, how many does not
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids,
                    answer_mask=answer_mask_for(mask, 4), gumbel_tau=0.5)
        ratios.append(out.image_keep_ratio.detach())
    out.loss.backward()
    assert all(torch.equal(r, torch.full((2,), 0.25)) for r in ratios)
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("model.language_model.image_predictor")]
    assert grads and sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    gumbel = tiny_dynamic(image_keep_rate=0.25).train()
    counts = {float(gumbel(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids,
                           gumbel_tau=0.5).image_keep_ratio[0]) for _ in range(5)}
    assert len(counts) > 1  # the paper's per-token sample: the count varies


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


def test_per_answer_loss_weighs_every_answer_alike():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 11, requires_grad=True)
    # sample 0: two answers of 2 and 1 tokens (a two-turn record); sample 1: one answer of 7 tokens
    labels = torch.tensor([[-100, -100, 1, 2, -100, -100, 3, -100, -100], [-100, -100, 4, 5, 6, 7, 8, 9, 10]])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                            ignore_index=-100)
    expected = (nll[0, 1:3].mean() + nll[0, 5] + nll[1, 1:8].mean()) / 3
    torch.testing.assert_close(per_answer_loss(logits, labels), expected)
    token_mean = nll.sum() / (labels[:, 1:] >= 0).sum()
    assert not torch.allclose(expected, token_mean)  # the long answer no longer dominates
    per_answer_loss(logits, labels).backward()
    assert logits.grad[1, 0].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0  # only positions predicting labels
    assert per_answer_loss(logits, torch.full_like(labels, -100)) == 0


def test_balanced_mask_gradient_is_centred_and_of_fixed_size():
    keep = torch.ones(2, 6, requires_grad=True)
    image = torch.tensor([[0, 1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    answer = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = balance_mask_gradient(keep, [image, answer], scale=0.5)
    assert torch.equal(out, keep)
    upstream = torch.tensor([[5.0, 1e4, -3e4, 7.0, 2.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    (out * upstream).sum().backward()
    grad = keep.grad
    for group, sample in ((image, 0), (image, 1), (answer, 0)):
        values = grad[sample][group[sample]]
        torch.testing.assert_close(values.sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
        n = len(values)
        torch.testing.assert_close(values.pow(2).mean().sqrt(), torch.tensor(0.5 / (n * 2)))
    assert grad[0, 2] < grad[0, 3] < grad[0, 1]  # the order within a sample is the LM's
    assert torch.equal(grad[1, 4:], upstream[1, 4:]) and torch.equal(grad[:, 0], upstream[:, 0])  # outside: as is


def _predictor_grads(mask_gradient, lm_factor):
    model = tiny_dynamic(mask_gradient=mask_gradient, budget_weight=1.0).train()
    ids, mask, pixels = make_prompts([3, 6], [8, 5], seed=1)
    torch.manual_seed(0)  # the same Gumbel noise in each call
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids,
                answer_mask=answer_mask_for(mask, 4), gumbel_tau=0.5)
    (lm_factor * out.lm_loss).backward()
    return [p.grad.clone() for n, p in model.named_parameters() if "predictor" in n]


def test_balanced_mask_gradient_does_not_grow_with_the_lm_loss():
    """However large the LM's gradient on the masks, it reaches the predictors at one size ("raw" scales with it)."""
    small, large = _predictor_grads("balanced", 1.0), _predictor_grads("balanced", 1000.0)
    for a, b in zip(small, large):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert all(float(g.abs().sum()) > 0 for g in small)  # every predictor weight still learns from the LM
    small, large = _predictor_grads("raw", 1.0), _predictor_grads("raw", 1000.0)
    for a, b in zip(small, large):
        torch.testing.assert_close(1000.0 * a, b, atol=1e-6, rtol=1e-4)


def test_layers_from_k_run_their_own_forward_with_the_masked_attention():
    """Hooks on a whole decoder layer see the training path (what FSDP-style wrapping needs); the shared
    config's attention implementation is what it was afterwards."""
    model = tiny_dynamic().train()
    k = model.config.sparse_layer
    seen = []
    model.model.language_model.layers[k].register_forward_hook(lambda module, args, kwargs_out: seen.append(True))
    ids, mask, pixels = make_prompts([3, 6], [8, 5], seed=1)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids,
                answer_mask=answer_mask_for(mask, 4), gumbel_tau=0.5)
    out.loss.backward()
    assert seen == [True]
    assert model.config.text_config._attn_implementation == "sdpa"
