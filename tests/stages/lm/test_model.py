"""CausalLM behaviour: packing (position reset + document mask), loss, KV-cache generation, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.lm.loss import cross_entropy, linear_cross_entropy
from stages.lm.model import CausalLM, KVCache, ModelConfig


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                 max_seq_len=64), **kw})


def model(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny(**kw)).eval()


def test_init_is_deterministic_given_the_seed_and_scaled():
    a, b, c = model(0), model(0), model(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    deep = CausalLM(tiny(n_layers=8))
    # residual-writing projections are scaled down by sqrt(2 * n_layers)
    ratio = deep.layers[0].attn.qkv.weight.std() / deep.layers[0].attn.out.weight.std()
    assert 3.0 < ratio < 5.0


def test_config_rejects_inconsistent_heads_and_derives_llama_ffn():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        tiny(dim=30)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="extra"):
        ModelConfig(**tiny().model_dump(), bogus=1)
    # LLaMA-3-8B: 4096 * 8/3 * 1.3 rounded up to a multiple of 1024 = 14336
    cfg = ModelConfig(vocab_size=10, dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                      multiple_of=1024)
    assert cfg.hidden_dim == 14336 and cfg.kv_heads == 8 and cfg.head_dim == 128
    assert tiny(n_kv_heads=None).kv_heads == 4


def test_packed_row_equals_each_document_alone():
    m = model()
    docs = [torch.randint(0, 61, (n,)) for n in (7, 12, 5)]
    row = torch.cat(docs)[None]  # (1, 24)
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc_mask = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = m(row, position_ids=position_ids, doc_mask=doc_mask).logits[0]
        alone = torch.cat([m(d[None]).logits[0] for d in docs])
        unmasked = m(row, position_ids=position_ids).logits[0]
    assert (packed - alone).abs().max() < 1e-5
    # without the mask, later documents see earlier ones: the mask is what makes them independent
    assert (unmasked[7:] - alone[7:]).abs().max() > 1e-3
    assert (unmasked[:7] - alone[:7]).abs().max() < 1e-5


def test_loss_is_mean_cross_entropy_over_labels_not_ignored():
    m = model()
    ids = torch.randint(0, 61, (2, 10))
    labels = torch.randint(0, 61, (2, 10))
    labels[0, :4] = -100
    with torch.no_grad():
        out = m(ids, labels=labels)
    keep = labels != -100
    expected = F.cross_entropy(out.logits[keep], labels[keep])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out["loss"] is out.loss and out["logits"] is out.logits
    all_ignored = m(ids, labels=torch.full_like(labels, -100))
    assert all_ignored.loss.item() == 0.0
    all_ignored.loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in m.parameters())


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 61 * 3])  # one chunk, and chunks of 3 rows
def test_fused_projection_and_loss_match_the_plain_computation(chunk_bytes):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(61, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 61, (2, 9))
    labels[1, 3:] = -100
    # a loss that also uses the logits gets exact gradients too; without kept logits, none are made
    for use_logits, keep in ((False, True), (True, True), (False, False)):
        loss, logits = linear_cross_entropy(x, w, labels, chunk_bytes=chunk_bytes, keep_logits=keep)
        total = loss + (logits.pow(2).mean() if use_logits else 0)
        gx, gw = torch.autograd.grad(total, (x, w))
        ref_logits = x @ w.T
        ref = cross_entropy(ref_logits, labels) + (ref_logits.pow(2).mean() if use_logits else 0)
        rx, rw = torch.autograd.grad(ref, (x, w))
        assert torch.allclose(loss, cross_entropy(ref_logits, labels))
        assert torch.allclose(logits, ref_logits) if keep else logits is None
        assert torch.allclose(gx, rx) and torch.allclose(gw, rw)


def test_training_forward_gradients_match_eval_path_and_checkpointing():
    m = model(tie_embeddings=True).train()
    ids, labels = torch.randint(0, 61, (2, 12)), torch.randint(0, 61, (2, 12))
    m(ids, labels=labels).loss.backward()  # fused path
    fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    cross_entropy(m(ids).logits, labels).backward()  # plain path
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    out = m(ids, labels=labels, return_logits=False)  # loss only: no logits materialised
    assert out.logits is None
    out.loss.backward()
    loss_only = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.activation_checkpointing = True
    m(ids, labels=labels).loss.backward()
    for n, p in m.named_parameters():
        for other in (plain, loss_only, {n: p.grad}):
            assert torch.allclose(other[n], fused[n], atol=1e-6), n


def test_chunked_prefill_with_cache_equals_full_forward():
    m = model()
    ids = torch.randint(0, 61, (2, 15))
    with torch.no_grad():
        full = m(ids).logits
        cache = KVCache(m.cfg, 2, 20, torch.device("cpu"), torch.float32)
        parts = [m(ids[:, s:e], cache=cache).logits for s, e in ((0, 6), (6, 7), (7, 15))]
    assert cache.pos == 15
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_greedy_generation_with_cache_equals_without_and_handles_ragged_prompts():
    m = model()
    prompts = [[5, 9, 2, 7, 1], [3, 3], [8, 1, 4]]
    cached = m.generate(prompts, max_new_tokens=8)
    uncached = m.generate(prompts, max_new_tokens=8, use_cache=False)
    alone = [m.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert cached == uncached == alone
    assert all(len(r) == 8 for r in cached)
    # the same continuation, token by token, from full forwards
    seq = list(prompts[0])
    for _ in range(8):
        with torch.no_grad():
            seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[5:] == cached[0]


def test_generation_stops_at_stop_tokens_and_samples_reproducibly():
    m = model()
    prompt = torch.tensor([[4, 5, 6]])
    greedy = m.generate(prompt, max_new_tokens=6)[0]
    stop = greedy[2]
    stopped = m.generate(prompt, max_new_tokens=6, stop_tokens=[stop])[0]
    assert stopped == greedy[: greedy.index(stop) + 1]
    a = m.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = m.generate(prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
    # a nucleus this small keeps only the most likely token: greedy again
    assert m.generate(prompt, 6, temperature=0.7, top_p=1e-6)[0] == greedy
    with pytest.raises(ValueError, match="empty"):
        m.generate([[1], []], 2)
