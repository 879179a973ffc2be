"""A LLaMA-style causal language model in one file.

Pre-norm decoder blocks: RMSNorm -> grouped-query attention with rotary positions -> residual,
RMSNorm -> SwiGLU feed-forward -> residual. It computes exactly what Hugging Face's
``LlamaForCausalLM`` computes (see ``stages/lm/hf.py`` for the weight mapping), with a few layout
choices made for speed:

- q, k and v come from one fused projection and gate/up from another (split again on export);
- rotary cos/sin are computed once per forward, in the half-split ("rotate_half") convention that
  Hugging Face uses, so export needs no q/k permutation;
- attention is ``scaled_dot_product_attention`` with ``enable_gqa`` (no K/V copies per query group) and
  the ``is_causal`` fast path when no document mask is given;
- with labels, the output projection and the cross-entropy run fused in chunks (``stages/lm/loss.py``),
  and a loss-only training step never materialises the (B, T, V) logits.

Shape legend: B batch, T new tokens, P tokens already in the KV cache, S = P + T, D model dim,
H query heads, K key/value heads, E head dim, F feed-forward dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.lm.loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy
from stages.lm.model_config import ModelConfig

__all__ = ["IGNORE_INDEX", "CausalLM", "CausalLMOutput", "KVCache", "ModelConfig"]


class CausalLMOutput(dict):
    """What ``CausalLM.forward`` returns: a dict with ``logits`` (B, T, V) (None when a training step
    asked for the loss only) and ``loss`` (scalar mean cross-entropy over labels != -100, or None),
    also readable as attributes (``out.loss``).

    A dict (like transformers' ``ModelOutput``) so that wrappers which walk module outputs, such as
    DeepSpeed ZeRO-3's backward hooks, see the tensors inside.
    """

    @property
    def logits(self) -> torch.Tensor | None:
        return self["logits"]

    @property
    def loss(self) -> torch.Tensor | None:
        return self["loss"]


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for ``max_len`` positions per row.

    ``doc`` holds each cached token's document id so that a later chunk attends only within its own
    document (generation uses it to keep left padding out of attention).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)  # (B, K, max_len, E)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.doc = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # (B, max_len)
        self.masked = False  # True once any chunk came with a doc mask
        self.pos = 0  # P: number of cached positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's (B, K, T, E) keys/values; return all cached ones, (B, K, S, E)."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Lower precision: normalise in float32, round, then scale (the reference's order).
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return self.weight * y


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles for each position: (B, T) -> cos, sin of shape (B, T, 1, E/2).

    Computed in float32 from scratch every forward (a few thousand numbers): no buffer to be cast to
    bfloat16 by ``model.to(...)``, nothing for ZeRO-3 to partition or checkpoints to carry.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=position_ids.device) / head_dim))  # (E/2,)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, E/2)
    return angles.cos().to(dtype)[:, :, None, :], angles.sin().to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + E/2]) by the position's angle: (B, T, n, E) -> (B, T, n, E)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, n, E/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention: H query heads share K key/value heads (K divides H)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (B, T, 1, E/2)
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, or None for plain causal attention
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, E = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * K, E)
        qk = apply_rope(qkv[:, :, : H + K], cos, sin)  # queries and keys rotated in one go
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, E)
        k = qk[:, :, H:].transpose(1, 2)  # (B, K, T, E)
        v = qkv[:, :, H + K :].transpose(1, 2)  # (B, K, T, E)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, E)
        causal = mask is None and q.shape[2] == k.shape[2] and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != K)
        return self.out(y.transpose(1, 2).reshape(B, T, H * E))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder layer."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache):  # (B, T, D) -> (B, T, D)
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


def attention_mask(
    doc_mask: torch.Tensor | None, cache: KVCache | None, T: int, device: torch.device
) -> torch.Tensor | None:
    """(B, 1, T, S) bool mask (True = may attend), or None when plain causal attention is exact.

    Query i (absolute position P + i) sees key j iff j <= P + i and both lie in the same document.
    """
    P = cache.pos if cache is not None else 0
    if cache is not None:  # remember the chunk's document ids for later chunks
        cache.doc[:, P : P + T] = 1 if doc_mask is None else doc_mask
        cache.masked = cache.masked or doc_mask is not None
    by_doc = doc_mask is not None or (cache is not None and cache.masked)
    if not by_doc and (P == 0 or T == 1):
        return None  # is_causal (no cache prefix), or single queries that see the whole cache
    causal = torch.arange(P + T, device=device)[None, :] <= torch.arange(P, P + T, device=device)[:, None]
    if not by_doc:
        return causal[None, None]  # (1, 1, T, S)
    queries = cache.doc[:, P : P + T] if cache is not None else doc_mask  # (B, T)
    keys = cache.doc[:, : P + T] if cache is not None else doc_mask  # (B, S)
    same = queries[:, :, None] == keys[:, None, :]  # (B, T, S)
    return (same & causal)[:, None]


class CausalLM(nn.Module):
    """Token embeddings -> n_layers blocks -> final RMSNorm -> output projection (tied or not)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; the projections that write into the residual stream
        (attention output, feed-forward down) are scaled by 1/sqrt(2 * n_layers) so the residual's
        variance does not grow with depth. Deterministic given ``torch.manual_seed``."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.layers:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.normal_(block.ffn.gate_up.weight, std=std)
            for w in (block.attn.out.weight, block.ffn.down.weight):
                nn.init.normal_(w, std=std / math.sqrt(2 * self.cfg.n_layers))
            block.attn_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, D) output projection: the embedding matrix when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T); default P, P+1, ...
        doc_mask: torch.Tensor | None = None,  # (B, T) segment ids; attention stays within a segment
        labels: torch.Tensor | None = None,  # (B, T) already aligned targets; -100 = ignore
        cache: KVCache | None = None,
        last_only: bool = False,  # compute logits for the last position only (generation)
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """Logits for every position and, given ``labels``, the mean cross-entropy loss.

        With labels and gradients enabled, the output projection and the loss are computed together
        in chunks (same values and gradients as the plain way, less time and memory). A training step
        that needs only the loss should pass ``return_logits=False``: the (B, T, V) logits are then
        never materialised, and ``logits`` is None.
        """
        B, T = input_ids.shape
        P = cache.pos if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(P, P + T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = attention_mask(doc_mask, cache, T, input_ids.device)
        for block in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x[:, -1:] if last_only else x)
        if labels is not None and torch.is_grad_enabled() and not last_only:
            loss, logits = linear_cross_entropy(x, self.output_weight, labels, keep_logits=return_logits)
            return CausalLMOutput(logits=logits, loss=loss)
        logits = F.linear(x, self.output_weight)  # (B, T, V)
        loss = None if labels is None else cross_entropy(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(
        self,
        prompts: torch.Tensor | list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_tokens: tuple[int, ...] | list[int] = (),
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        ``prompts`` is a (B, T) tensor or a list of token lists of any lengths (left-padded inside,
        with padding kept out of attention). ``temperature`` 0 is greedy; otherwise tokens are
        sampled from the softmax at that temperature, restricted to the smallest set of tokens whose
        probability reaches ``top_p``. A row stops after producing one of ``stop_tokens`` (which is
        included in its output). Returns the new tokens of each row.
        """
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        ids, real = left_pad(prompts, device)  # (B, T) tokens; real: 1 for a token, 0 for padding
        B, T = ids.shape
        padded = not bool(real.all())
        positions = (real.cumsum(1) - 1).clamp(min=0)  # (B, T): every prompt starts at position 0
        cache = KVCache(self.cfg, B, T + max_new_tokens, device, dtype) if use_cache else None
        stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            s = cache.pos if cache is not None else 0  # with a cache, feed only the tokens not yet seen
            doc = real[:, s:] if padded else None
            logits = self(ids[:, s:], positions[:, s:], doc_mask=doc, cache=cache, last_only=True).logits
            nxt = sample_next(logits[:, -1].float(), temperature, top_p, generator)  # (B,)
            for b in (~done).nonzero().flatten().tolist():
                out[b].append(int(nxt[b]))
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            ids = torch.cat((ids, nxt[:, None]), 1)
            positions = torch.cat((positions, positions[:, -1:] + 1), 1)
            real = torch.cat((real, torch.ones_like(nxt)[:, None]), 1)
        return out


def left_pad(prompts: torch.Tensor | list[list[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Prompts -> (B, T) token ids left-padded with 0, and (B, T) 1/0 marks of real tokens."""
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate needs at least one prompt, and no empty prompts")
    T = max(len(r) for r in rows)
    ids = [[0] * (T - len(r)) + r for r in rows]
    real = [[0] * (T - len(r)) + [1] * len(r) for r in rows]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(real, dtype=torch.long, device=device))


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) float logits -> (B,) next tokens: greedy, or temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
