"""A character-level GPT, after Karpathy's nanoGPT ``model.py`` (MIT licence).

Same architecture and initialisation as nanoGPT: learned token and position embeddings,
pre-LayerNorm transformer blocks (causal self-attention through
``F.scaled_dot_product_attention``, then a 4x GELU MLP), a final LayerNorm, and an output head
whose weight is tied to the token embedding. Weights are drawn from N(0, 0.02), biases zero,
and every residual output projection (``c_proj``) from N(0, 0.02 / sqrt(2 * n_layer)) (GPT-2).

Unlike nanoGPT there is NO dropout anywhere: a verifier must be able to replay a training step
and recompute the same gradients (SPEC.md, "Verification of training work"), and dropout
would make each step depend on hidden RNG state. The model has no other randomness; the
initial weights come from torch's global RNG, so seed it (``torch.manual_seed``) first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.nn import functional as F

MAX_VOCAB = 65_536  # the corpus stores token ids as at most uint16


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT. All fields are positive integers; checked on construction (ValueError).

    n_layer: number of transformer blocks.
    n_head: attention heads per block; must divide n_embd (head size = n_embd // n_head).
    n_embd: width of the residual stream (embedding dimension), in channels.
    block_size: context length in tokens: the longest sequence forward() accepts and the size
        of the position embedding table.
    vocab_size: number of token ids (characters), at most 65,536.
    bias: whether Linear layers and LayerNorms have a bias (nanoGPT's option; False is a
        little faster and as good).
    """

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    bias: bool = False

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.vocab_size > MAX_VOCAB:
            raise ValueError(f"vocab_size {self.vocab_size} exceeds {MAX_VOCAB}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be true or false, got {self.bias!r}")


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with an optional bias (torch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., ndim) -> (..., ndim)."""
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """One pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """nanoGPT's GPT without dropout. Parameters are fp32 on construction.

    Initial weights come from torch's global RNG (seed it first for a reproducible model).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one (V, C) matrix embeds tokens and scores the output.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                # GPT-2: scale the residual projections so the residual stream's variance
                # does not grow with depth.
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, the tied wte/lm_head matrix counted once.

        non_embedding=True leaves out the position embeddings (nanoGPT's reported count).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next-token logits for every position, and the mean cross-entropy if targets are given.

        idx: (B, T) int64 token ids, T <= block_size.
        targets: (B, T) int64 token ids, the next token of each position; -1 is ignored.
        Returns (logits (B, T, vocab_size) fp32, loss: 0-d tensor in nats per token, or None).
        Raises ValueError if T exceeds block_size.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = tok_emb + pos_emb  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt, one at a time.

        idx: (B, T0) int64 prompt, T0 >= 1; the context fed to the model is cropped to the last
            block_size tokens.
        temperature: > 0; logits are divided by it (lower is more conservative).
        top_k: if given, sample only among the k most likely tokens.
        generator: torch.Generator for torch.multinomial, for reproducible samples.
        Returns (B, T0 + max_new_tokens) int64: the prompt followed by the samples.
        Raises ValueError for max_new_tokens < 0, temperature <= 0, top_k < 1 or an empty prompt.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if idx.dim() != 2 or idx.size(1) < 1:
            raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # (B, <= block_size)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


MODEL_CFG_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


def build_model(model_cfg: Mapping[str, Any], vocab_size: int) -> GPT:
    """A freshly initialised GPT for a job spec's model section.

    model_cfg: keys n_layer, n_head, n_embd, block_size (positive ints, n_embd divisible by
        n_head) and optionally bias (bool, default False); no other keys.
    vocab_size: from the corpus (Corpus.vocab_size).
    Raises ValueError naming the key or the numbers at fault. Weights come from torch's global
    RNG: call torch.manual_seed(job seed) first so every rank and the verifier get the same model.
    """
    missing = [k for k in MODEL_CFG_KEYS if k not in model_cfg]
    unknown = sorted(set(model_cfg) - set(MODEL_CFG_KEYS) - {"bias"})
    if missing or unknown:
        raise ValueError(f"model config: missing keys {missing}, unknown keys {unknown}")
    config = GPTConfig(
        n_layer=model_cfg["n_layer"],
        n_head=model_cfg["n_head"],
        n_embd=model_cfg["n_embd"],
        block_size=model_cfg["block_size"],
        vocab_size=vocab_size,
        bias=model_cfg.get("bias", False),
    )
    return GPT(config)
