"""Parameter counts, training FLOPs per token and model FLOPs utilisation (torch-free).

FLOPs per token follow torchtitan / PaLM: ``6 * N + 12 * L * H * Q * T`` where N counts the weights
used in matrix multiplies (everything but the embedding lookup; the output projection counts once even
when it is tied to the embedding), L layers, H heads, Q head dim, T sequence length. The first term is
forward (2N) + backward (4N); the second is attention's score and value products.
"""

from __future__ import annotations

from stages.lm.model_config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched against torch.cuda.get_device_name().
# More specific names come first (e.g. "H100 NVL" before "H100").
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM and other variants
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2.25e15),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("MI325X", 1300e12),
    ("MI300X", 1300e12),
    ("MI250X", 191.5e12),
]


def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Number of parameters; ``embeddings=False`` leaves out the input embedding table (but keeps the
    output projection's weights when untied)."""
    d, f, e = cfg.dim, cfg.hidden_dim, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.kv_heads) * e + cfg.n_heads * e * d
    per_layer = attn + 3 * d * f + 2 * d  # + two RMSNorm weights
    emb = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.n_layers * per_layer + d + head + (emb if embeddings else 0)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matrix multiplies per token (the output projection included once)."""
    return param_count(cfg, embeddings=False) + (cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of a device by name (e.g. "NVIDIA H100 80GB HBM3"); None if unknown."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (a fraction)."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_s * flops_per_token / peak
