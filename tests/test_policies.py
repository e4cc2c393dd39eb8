"""One suite for every token-selection policy: a new policy is tested by adding one line to CASES.

Each case runs the same checks: batched == one by one, cache == no cache, image tokens kept per
image, per-layer cache lengths and bytes, and the policy switched off == the stock model. Focused
tests at the bottom check what is specific to a policy (FastV against eager attention weights, the
StreamingLLM window, the cache's eviction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

import dynamic_llava.policies as policies
from dynamic_llava import (
    CDPrunerPolicy,
    ComposedPolicy,
    DARTPolicy,
    DynamicLlavaCache,
    FastVPolicy,
    H2OPolicy,
    LearnedPolicy,
    RandomPolicy,
    SparsityStats,
    StreamingLLMPolicy,
    TokenPolicy,
)
from tiny import IMAGE_TOKEN, make_prompts, stock_copy, tiny_dynamic

ATTN = ["sdpa", "eager"]
GEN = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
NO_PREDICTORS = dict(use_image_predictor=False, use_text_predictor=False)


@dataclass
class Case:
    """A policy with one parameter set, and what the suite should expect of it."""

    policy: TokenPolicy
    off: TokenPolicy  # the same policy with every rate at 1.0 / nothing evicted: must equal the stock model
    image_rate: float | None = None  # share of each image kept (None: images untouched)
    model: dict = field(default_factory=dict)  # tiny_dynamic overrides
    off_model: dict = field(default_factory=dict)  # extra overrides for the `off` run
    cache_only: bool = False  # refuses decoding without a cache (with a clear error)


CASES = {
    "learned": Case(LearnedPolicy(), LearnedPolicy(image_keep_rate=1.0), 0.25, off_model=dict(text_keep_rate=1.0)),
    "random": Case(RandomPolicy(0.3, 0.5, seed=1), RandomPolicy(1.0, 1.0, seed=1), 0.3),
    "fastv": Case(FastVPolicy(0.25), FastVPolicy(1.0), 0.25),
    "fastv-no-predictors": Case(FastVPolicy(0.5), FastVPolicy(1.0), 0.5, model=NO_PREDICTORS),
    "cdpruner": Case(CDPrunerPolicy(0.25), CDPrunerPolicy(1.0), 0.25),
    "cdpruner-diversity-only": Case(CDPrunerPolicy(0.5, theta=0.0), CDPrunerPolicy(1.0), 0.5, model=NO_PREDICTORS),
    "dart": Case(DARTPolicy(0.25), DARTPolicy(1.0), 0.25),
    "dart-image-pivots-only": Case(DARTPolicy(0.5, image_pivots=2, text_pivots=0), DARTPolicy(1.0), 0.5),
    "streaming-1": Case(StreamingLLMPolicy(window=1), StreamingLLMPolicy(window=10**6)),
    "streaming-3": Case(StreamingLLMPolicy(window=3), StreamingLLMPolicy(window=10**6), model=NO_PREDICTORS),
    "h2o": Case(H2OPolicy(heavy=2, recent=3), H2OPolicy(heavy=10**6, recent=10**6), cache_only=True),
    "composed": Case(ComposedPolicy(images=FastVPolicy(), text=LearnedPolicy(), evict=StreamingLLMPolicy(window=3),
                                    image_keep_rate=0.25),
                     ComposedPolicy(images=FastVPolicy(1.0), evict=StreamingLLMPolicy(window=10**6)), 0.25),
    "composed-h2o": Case(ComposedPolicy(images=RandomPolicy(seed=2), evict=H2OPolicy(heavy=2, recent=3),
                                        image_keep_rate=0.5),
                         ComposedPolicy(images=RandomPolicy(1.0), evict=H2OPolicy(heavy=10**6, recent=10**6)), 0.5,
                         cache_only=True),
}
case_params = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def unpad(ids, mask, i):
    n = int(mask[i].sum())
    return ids[i : i + 1, -n:], mask[i : i + 1, -n:]


def generate(model, ids, mask, pixels, policy, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_policy=policy,
                              **{**GEN, **kwargs})


def refuses_no_cache(model, ids, mask, pixels, policy):
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(model, ids, mask, pixels, policy, use_cache=False)


def test_every_policy_is_in_the_suite():
    exported = {getattr(policies, name) for name in policies.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, TokenPolicy) and c is not TokenPolicy}
    assert classes <= {type(case.policy) for case in CASES.values()}


@case_params
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_equals_one_by_one(case, attn, use_cache):
    model = tiny_dynamic(attn=attn, **case.model)
    ids, mask, pixels = make_prompts([3, 6, 1, 4], [4, 2, 7, 1], seed=4)
    if case.cache_only and not use_cache:
        return refuses_no_cache(model, ids, mask, pixels, case.policy)
    batched = generate(model, ids, mask, pixels, case.policy, use_cache=use_cache)
    for i in range(ids.shape[0]):
        one_ids, one_mask = unpad(ids, mask, i)
        single = generate(model, one_ids, one_mask, pixels[i : i + 1], case.policy, use_cache=use_cache)
        assert torch.equal(single[0, one_ids.shape[1] :], batched[i, ids.shape[1] :]), f"sample {i}"


@case_params
@pytest.mark.parametrize("attn", ATTN)
def test_cache_equals_no_cache(case, attn):
    model = tiny_dynamic(attn=attn, **case.model)
    ids, mask, pixels = make_prompts([2, 5, 1], [3, 1, 6], seed=5)
    with_cache = generate(model, ids, mask, pixels, case.policy)
    if case.cache_only:
        return refuses_no_cache(model, ids, mask, pixels, case.policy)
    without = generate(model, ids, mask, pixels, case.policy, use_cache=False)
    assert torch.equal(with_cache, without)


@case_params
@pytest.mark.parametrize("attn", ATTN)
def test_image_tokens_kept_per_image(case, attn):
    model = tiny_dynamic(attn=attn, **case.model)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], images_per_prompt=2, seed=6)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_policy=case.policy)
    kept = torch.ones_like(mask, dtype=torch.bool)
    if out.kept_index is not None:
        kept = torch.zeros_like(kept).scatter_(1, out.kept_index, out.kept_valid)
    per_image = model.tokens_per_image()
    expected = per_image if case.image_rate is None else math.floor(case.image_rate * per_image)
    for b in range(ids.shape[0]):
        image = (ids[b] == IMAGE_TOKEN).nonzero().flatten()
        for start in image[::per_image].tolist():
            assert int(kept[b, start : start + per_image].sum()) == expected
        assert bool(kept[b][mask[b].bool() & (ids[b] != IMAGE_TOKEN)].all())  # text is never dropped at prefill


@case_params
def test_cache_lengths_and_bytes(case):
    model = tiny_dynamic(**case.model)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=7)
    cache, stats = DynamicLlavaCache.from_config(model.config), SparsityStats()
    new = 16
    out = generate(model, ids, mask, pixels, case.policy, past_key_values=cache, sparsity_stats=stats,
                   max_new_tokens=new, min_new_tokens=new)
    assert out.shape[1] == ids.shape[1] + new
    judged = new - 1  # the last generated token is never fed back
    per_image = model.tokens_per_image()
    images_kept = per_image if case.image_rate is None else math.floor(case.image_rate * per_image)
    assert stats.image_tokens_kept.tolist() == [images_kept] * 3
    assert stats.generated_tokens.tolist() == [judged] * 3
    evicted = stats.generated_tokens_evicted if stats.generated_tokens_evicted is not None else 0
    held = mask.sum(dim=1) - per_image + images_kept + stats.generated_tokens_kept - evicted
    k = model.config.sparse_layer
    for i, lengths in enumerate(cache.layer_lengths()):
        expected = [ids.shape[1] + judged] * 3 if i < k else held.tolist()
        assert lengths.tolist() == expected, f"layer {i}"
    assert cache.layers[k].keys.shape[-2] == int(held.max())  # as long as the longest sample, no longer
    assert stats.total_kv_bytes == cache.nbytes() < cache.dense_nbytes()


@case_params
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("use_cache", [True, False])
def test_off_equals_stock(case, attn, use_cache):
    """Every rate at 1.0 / nothing evicted: the logits of every step are the stock model's."""
    model = tiny_dynamic(attn=attn, **case.model, **case.off_model)
    stock = stock_copy(model, attn)
    ids, mask, pixels = make_prompts([2, 5, 1], [3, 1, 6], seed=2)
    if case.cache_only and not use_cache:
        return refuses_no_cache(model, ids, mask, pixels, case.off)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                  suppress_tokens=[IMAGE_TOKEN], output_logits=True, return_dict_in_generate=True, use_cache=use_cache)
    with torch.no_grad():
        ours = model.generate(**kwargs, sparsity_policy=case.off)
        theirs = stock.generate(**kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---- FastV ----


class RecordingFastV(FastVPolicy):
    def image_scores(self, model, hidden, positions, context):
        self.scores = super().image_scores(model, hidden, positions, context)
        return self.scores


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("sparse_layer", [1, 2, 3])
def test_fastv_scores_are_eager_attention_of_layer_k_minus_1(attn, sparse_layer):
    """FastV's scores equal layer K-1's eager attention weights (last prompt token -> image tokens, mean
    over heads) of a stock model, and select the same tokens; our layers stay on `attn`."""
    model = tiny_dynamic(attn=attn, sparse_layer=sparse_layer, **NO_PREDICTORS)
    stock = stock_copy(model, "eager")
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], images_per_prompt=2, seed=12)
    policy = RecordingFastV(image_keep_rate=0.25)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_policy=policy)
        attentions = stock(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True).attentions
    assert model.config._attn_implementation == attn
    image = ids == IMAGE_TOKEN
    per_image = model.tokens_per_image()
    reference = attentions[sparse_layer - 1][:, :, -1, :].mean(dim=1)[image].view(-1, per_image)
    torch.testing.assert_close(policy.scores, reference, atol=1e-6, rtol=1e-5)
    n_keep = math.floor(0.25 * per_image)
    chosen = torch.zeros_like(reference, dtype=torch.bool).scatter_(1, reference.topk(n_keep, dim=1).indices, True)
    kept = torch.zeros_like(image).scatter_(1, out.kept_index, out.kept_valid)
    assert torch.equal(kept[image].view(-1, per_image), chosen)


def test_fastv_scores_ignore_generated_tokens():
    """Without a cache each step rescores the images from the last prompt token, not the newest token."""
    model = tiny_dynamic(**NO_PREDICTORS)
    ids, mask, pixels = make_prompts([2, 4], [3, 1], seed=13)
    policy = RecordingFastV(image_keep_rate=0.25)
    generate(model, ids, mask, pixels, policy, max_new_tokens=1, min_new_tokens=1)
    prefill = policy.scores
    generate(model, ids, mask, pixels, policy, use_cache=False, max_new_tokens=5, min_new_tokens=5)
    torch.testing.assert_close(policy.scores, prefill, atol=1e-6, rtol=0)


# ---- StreamingLLM and eviction ----


@pytest.mark.parametrize("window", [1, 3, 50])
@pytest.mark.parametrize("use_cache", [True, False])
def test_streaming_window_holds_min_window_generated(window, use_cache):
    model = tiny_dynamic(**NO_PREDICTORS)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=14)
    policy = StreamingLLMPolicy(window=window)
    prompt = mask.sum(dim=1)  # images untouched
    k = model.config.sparse_layer
    for new in range(1, 9):
        cache, stats = DynamicLlavaCache.from_config(model.config), SparsityStats()
        kwargs = dict(past_key_values=cache) if use_cache else dict(use_cache=False)
        generate(model, ids, mask, pixels, policy, sparsity_stats=stats, max_new_tokens=new, min_new_tokens=new,
                 **kwargs)
        fed = new - 1  # generated tokens that went through the model
        seen = min(window, fed)  # by the newest token, itself included
        evicted = stats.generated_tokens_evicted
        assert (evicted is None and fed <= 1) or evicted.tolist() == [fed - seen] * 3, (new, evicted)
        if use_cache:
            for lengths in cache.layer_lengths()[k:]:
                assert lengths.tolist() == (prompt + seen).tolist(), new


@pytest.mark.parametrize("use_cache", [True, False])
def test_streaming_window_changes_the_tokens(use_cache):
    """The window matters on these prompts, so cache == no cache above is not a dense tautology."""
    model = tiny_dynamic(**NO_PREDICTORS)
    ids, mask, pixels = make_prompts([2, 5, 1], [3, 1, 6], seed=5)
    windowed = generate(model, ids, mask, pixels, StreamingLLMPolicy(window=1), use_cache=use_cache)
    dense = generate(model, ids, mask, pixels, StreamingLLMPolicy(window=10**6), use_cache=use_cache)
    assert not torch.equal(windowed, dense)


def test_eviction_compacts_each_sample():
    cache = DynamicLlavaCache(num_layers=3, sparse_layer=1)
    batch, heads, dim, n = 3, 2, 4, 6
    keys = torch.arange(batch * heads * n * dim, dtype=torch.float32).view(batch, heads, n, dim)
    store = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    columns = torch.arange(n).expand(batch, -1).masked_fill(torch.arange(n) < 2, -1)
    cache.plan_step(store, torch.ones_like(store), columns)
    for layer in range(1, 3):
        cache.update(keys, -keys, layer)
    # slots hold tokens [0..5], [0, 2, 3, 4], [0, 1, 4, 5]; drop marks slots
    drop = torch.tensor([[0, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    evicted = cache.evict(drop)
    assert evicted.tolist() == [2, 1, 0]
    expected = [[0, 1, 3, 5], [0, 3, 4], [0, 1, 4, 5]]  # each sample's surviving tokens, in order
    for layer in cache.layers[1:]:
        assert layer.lengths.tolist() == [4, 3, 4]
        assert layer.keys.shape[-2] == 4
        for b, kept in enumerate(expected):
            assert torch.equal(layer.keys[b, :, : len(kept)], keys[b, :, kept])
            assert torch.equal(layer.values[b, :, : len(kept)], -keys[b, :, kept])
            assert layer.text_columns[b, : len(kept)].tolist() == [c if c >= 2 else -1 for c in kept]
    beams = torch.tensor([2, 0, 0])
    cache.reorder_cache(beams)
    assert cache.layers[1].lengths.tolist() == [4, 4, 4]
    assert torch.equal(cache.stored_text_columns()[0], torch.tensor([-1, -1, 4, 5]))
    assert cache.evict(torch.zeros(3, 4, dtype=torch.bool)).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "policy", [StreamingLLMPolicy(window=2), H2OPolicy(heavy=1, recent=2)], ids=["streaming", "h2o"]
)
def test_beam_search_with_eviction_equals_one_by_one(policy):
    model = tiny_dynamic(**NO_PREDICTORS)
    ids, mask, pixels = make_prompts([2, 5, 1], [3, 1, 4], seed=15)
    beams = generate(model, ids, mask, pixels, policy, num_beams=3)
    for i in range(ids.shape[0]):
        one_ids, one_mask = unpad(ids, mask, i)
        single = generate(model, one_ids, one_mask, pixels[i : i + 1], policy, num_beams=3)
        assert torch.equal(single[0, one_ids.shape[1] :], beams[i, ids.shape[1] :])


def test_h2o_scores_are_accumulated_eager_attention_of_layer_k():
    """With nothing evicted (and nothing pruned) the model is the stock one; H2O's per-slot scores are
    then the sum over decoding steps of layer K's eager attention weights, mean over heads."""
    model = tiny_dynamic(attn="sdpa", image_keep_rate=1.0, text_keep_rate=1.0)
    stock = stock_copy(model, "eager")
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=17)
    cache, new = DynamicLlavaCache.from_config(model.config), 6
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new, min_new_tokens=new,
                  do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    with torch.no_grad():
        ours = model.generate(**kwargs, past_key_values=cache, sparsity_policy=H2OPolicy(heavy=10**6, recent=10**6))
        theirs = stock.generate(**kwargs, output_attentions=True, return_dict_in_generate=True)
    assert torch.equal(ours, theirs.sequences)
    k, columns = model.config.sparse_layer, ids.shape[1] + new - 1
    received = torch.zeros(ids.shape[0], columns)
    for step in theirs.attentions[1:]:  # decoding steps (the prefill is not scored)
        row = step[k][:, :, -1, :].mean(dim=1)
        received[:, : row.shape[1]] += row
    real = torch.cat([mask, torch.ones(ids.shape[0], new - 1, dtype=mask.dtype)], dim=1).bool()
    layer = cache.layers[k]
    for b in range(ids.shape[0]):
        stored = layer.attention[b, : int(layer.lengths[b])]
        torch.testing.assert_close(stored, received[b, real[b]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("heavy, evicted", [(0, [1, 1, 1, 1, 0]), (1, [1, 1, 1, 0, 0]), (2, [1, 0, 1, 0, 0])])
def test_h2o_evicts_all_but_recent_and_heavy(heavy, evicted):
    from dynamic_llava import TextSlots

    slots = TextSlots(ages=torch.tensor([[5, 4, 3, 2, 1, 9]]), generated=torch.tensor([[1, 1, 1, 1, 1, 0]]).bool(),
                      attention=torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 7.0]]))
    drop = H2OPolicy(heavy=heavy, recent=2).text_evict(None, slots)
    assert drop[0, :5].long().tolist() == evicted and not drop[0, 5]  # the prompt slot is never evicted


def test_h2o_keeps_recent_and_heaviest():
    model = tiny_dynamic(**NO_PREDICTORS)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=16)
    cache = DynamicLlavaCache.from_config(model.config)
    generate(model, ids, mask, pixels, H2OPolicy(heavy=2, recent=3), past_key_values=cache, max_new_tokens=12)
    k = model.config.sparse_layer
    held = cache.stored_text_columns()
    assert ((held >= 0).sum(dim=1) == 5).all()  # heavy + recent generated tokens besides the prompt
    newest = held.max(dim=1, keepdim=True).values
    assert ((held >= newest - 2) & (held >= 0)).sum(dim=1).tolist() == [3] * 3  # the recent window
    assert cache.layers[k].attention.shape == held.shape


# ---- CDPruner and DART ----


def test_greedy_dpp_picks_what_naive_greedy_determinants_pick():
    """Each step adds the item that most increases det(L[S, S]) (computed naively here)."""
    from dynamic_llava.policies.cdpruner import greedy_dpp

    torch.manual_seed(0)
    features = torch.randn(3, 12, 5, dtype=torch.float64)
    kernel = features @ features.transpose(1, 2) + 1e-3 * torch.eye(12, dtype=torch.float64)
    chosen = greedy_dpp(kernel, 4)
    for b in range(3):
        picked = []
        for _ in range(4):
            rest = [i for i in range(12) if i not in picked]
            dets = [torch.linalg.det(kernel[b][[*picked, i]][:, [*picked, i]]) for i in rest]
            picked.append(rest[int(torch.stack(dets).argmax())])
        assert chosen[b].tolist() == picked


class RecordingDART(DARTPolicy):
    def image_scores(self, model, hidden, positions, context):
        self.hidden, self.context = hidden, context
        self.scores = super().image_scores(model, hidden, positions, context)
        return self.scores


def test_dart_keeps_its_pivots_and_the_least_duplicated_tokens():
    from dynamic_llava.policies import layer_keys

    model = tiny_dynamic(seed=3)
    ids, mask, pixels = make_prompts([3], [4], seed=3)
    policy = RecordingDART(image_keep_rate=0.5, image_pivots=2, text_pivots=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_policy=policy)
        layer = model.model.language_model.layers[model.config.sparse_layer]
        context = policy.context
        norms = layer_keys(layer, context.hidden, context.position_embeddings).norm(dim=-1).mean(1)
    image_norms = norms[context.image_token_mask].view(policy.hidden.shape[:2])
    pivots = image_norms[0].topk(2).indices
    unit = torch.nn.functional.normalize(policy.hidden[0].float(), dim=-1)
    duplication = (unit @ unit[pivots].T).max(dim=1).values
    expected = (-duplication).scatter(0, pivots, float("inf"))
    assert torch.equal(policy.scores[0], expected)
    assert torch.isinf(policy.scores[0][pivots]).all()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_probe_runs_the_layers_own_attention(family):
    """The probe gives eager attention's probabilities, also for layers with q/k norms (Qwen3)."""
    import importlib

    from transformers import AutoConfig

    from dynamic_llava.policies import attention_probe

    config = AutoConfig.for_model(family, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  intermediate_size=64, num_hidden_layers=1, vocab_size=50)
    config._attn_implementation = "eager"
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = {"llama": "Llama", "qwen3": "Qwen3"}[family]
    torch.manual_seed(0)
    layer = getattr(module, f"{prefix}DecoderLayer")(config, 0).eval()
    rotary = getattr(module, f"{prefix}RotaryEmbedding")(config)
    hidden = torch.randn(2, 7, 32)
    cos_sin = rotary(hidden, torch.arange(7).expand(2, -1))
    causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7)
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~causal.unsqueeze(1), torch.finfo(torch.float32).min)
    with torch.no_grad():
        _, weights = layer.self_attn(hidden_states=layer.input_layernorm(hidden), position_embeddings=cos_sin,
                                     attention_mask=additive)
        keys, probs = attention_probe(layer, hidden, cos_sin, allowed=causal)
        _, last = attention_probe(layer, hidden, cos_sin, allowed=causal[:, 4:5], rows=slice(4, 5))
    torch.testing.assert_close(probs, weights.mean(dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(last[:, 0], weights.mean(dim=1)[:, 4], atol=1e-6, rtol=1e-5)
    assert keys.shape == (2, 2, 7, 8) and config._attn_implementation == "eager"  # restored after


def test_diverse_ranks_pass_over_near_duplicates_and_are_prefix_consistent():
    from dynamic_llava.policies import learned_image_scores
    from dynamic_llava.policies.cdpruner import diverse_ranks

    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 16, generator=g)
    features[:, 1] = features[:, 0] + 1e-3  # token 1 nearly repeats token 0
    quality = torch.tensor([[1.0, 0.99, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]] * 2)
    ranks = diverse_ranks(quality, features, 4)
    assert ranks[0, 0] == 4 and ranks[0, 1] == -1  # the best first, its near-copy not among the four
    assert (ranks > 0).sum(1).tolist() == [4, 4]
    two = diverse_ranks(quality, features, 2)
    assert torch.equal(two.topk(2).indices.sort().values, ranks.topk(2).indices.sort().values)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 5:] = False
    assert (diverse_ranks(quality, features, 5, valid)[1, 5:] == -1).all()  # padding is never chosen

    class Settings:
        image_selection, image_relevance = "top", 0.8

    log_prob = quality.log()
    assert learned_image_scores(Settings, log_prob, features, None, 4) is log_prob  # the paper's top-k
    Settings.image_selection = "diverse"
    assert torch.equal(learned_image_scores(Settings, log_prob, features, None, 4) > 0, ranks > 0)
