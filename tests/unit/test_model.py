"""The main job's character GPT: shapes, initialisation, learning, sampling, determinism."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(REPO / "jobs")):  # the runtime imports the job as a top-level module
    if p not in sys.path:
        sys.path.insert(0, p)

from shakespeare_char import GPT, GPTConfig, build_model  # noqa: E402
from shakespeare_char.data import build_corpus  # noqa: E402

EXCERPT = REPO / "tests" / "data" / "shakespeare_excerpt.txt"
DEMO_CFG = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128}
SMALL_CFG = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64}


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(EXCERPT.read_text(encoding="utf-8"), val_fraction=0.1)


def _batch(data: np.ndarray, batch: int, block: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block - 1, (batch,), generator=gen).tolist()
    x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
    return x, y


def test_param_count_of_the_demo_model():
    torch.manual_seed(0)
    model = build_model(DEMO_CFG, vocab_size=84)
    d, L, V, T = 128, 4, 84, 128
    # per block: qkv 3d^2 + proj d^2 + mlp 8d^2 + two LayerNorm weights; tied V x d once; wpe T x d; ln_f d
    expected = L * (12 * d * d + 2 * d) + V * d + T * d + d
    assert model.num_params() == expected == 814_720
    assert model.num_params(non_embedding=True) == expected - T * d
    assert 0.78e6 < model.num_params() < 0.85e6
    assert model.lm_head.weight is model.transformer.wte.weight  # weight tying
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_init_follows_nanogpt():
    torch.manual_seed(0)
    model = build_model(DEMO_CFG, vocab_size=84)
    c_proj = model.transformer.h[0].attn.c_proj.weight
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(2 * 4)) < 0.001
    assert abs(c_attn.std().item() - 0.02) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias is None  # bias=False by default
    with_bias = build_model({**SMALL_CFG, "bias": True}, vocab_size=10)
    assert torch.count_nonzero(with_bias.transformer.h[0].mlp.c_fc.bias) == 0


def test_shapes_and_initial_loss(corpus):
    torch.manual_seed(1)
    model = build_model(SMALL_CFG, corpus.vocab_size)
    x, y = _batch(corpus.train, 8, 64, torch.Generator().manual_seed(0))
    logits, loss = model(x, y)
    assert logits.shape == (8, 64, corpus.vocab_size) and logits.dtype == torch.float32
    assert loss.shape == () and abs(loss.item() - math.log(corpus.vocab_size)) < 0.3
    logits_short, none = model(x[:, :10])
    assert none is None and logits_short.shape == (8, 10, corpus.vocab_size)
    # causal: the first 10 positions do not see what comes after them
    assert torch.allclose(logits_short, logits[:, :10], atol=1e-5)
    with pytest.raises(ValueError, match="65 exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_same_seed_same_model_and_deterministic_forward(corpus):
    x, y = _batch(corpus.train, 4, 64, torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    a = build_model(SMALL_CFG, corpus.vocab_size)
    torch.manual_seed(7)
    b = build_model(SMALL_CFG, corpus.vocab_size)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    a.train()  # training mode changes nothing: there is no dropout
    loss1 = a(x, y)[1]
    loss1.backward()
    g1 = [p.grad.clone() for p in a.parameters()]
    a.zero_grad()
    loss2 = a(x, y)[1]
    loss2.backward()
    assert torch.equal(loss1, loss2)
    assert all(torch.equal(g, p.grad) for g, p in zip(g1, a.parameters(), strict=True))


def test_adamw_lowers_the_loss(corpus):
    torch.manual_seed(0)
    model = build_model(SMALL_CFG, corpus.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    x_val, y_val = _batch(corpus.val, 32, 64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        before = model(x_val, y_val)[1].item()
    for _ in range(30):
        x, y = _batch(corpus.train, 16, 64, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(x_val, y_val)[1].item()
    # 30 steps take the 4.3-nat uniform guess to roughly unigram statistics (2.9 nats here)
    assert after < before - 0.7, (before, after)


def test_generate_length_and_reproducibility(corpus):
    torch.manual_seed(0)
    model = build_model(SMALL_CFG, corpus.vocab_size)
    prompt = torch.tensor([corpus.encode("ROMEO:\n")], dtype=torch.long)
    out = model.generate(prompt, 100, generator=torch.Generator().manual_seed(5))  # crosses block_size 64
    assert out.shape == (1, len("ROMEO:\n") + 100) and out.dtype == torch.long
    assert torch.equal(out[:, : prompt.size(1)], prompt)
    assert corpus.decode(out[0].tolist()).startswith("ROMEO:\n")
    again = model.generate(prompt, 100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)
    top1 = model.generate(prompt.repeat(2, 1), 5, top_k=1)  # greedy: both rows alike
    assert top1.shape == (2, prompt.size(1) + 5) and torch.equal(top1[0], top1[1])
    assert model.generate(prompt, 0).shape == prompt.shape
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=0.0)


@pytest.mark.parametrize(
    "cfg, vocab, message",
    [
        ({**DEMO_CFG, "n_embd": 130}, 84, "n_embd 130 is not divisible by n_head 4"),
        ({**DEMO_CFG, "n_layer": 0}, 84, "n_layer must be a positive integer, got 0"),
        ({**DEMO_CFG, "block_size": 12.5}, 84, "block_size must be a positive integer, got 12.5"),
        ({**DEMO_CFG, "n_head": True}, 84, "n_head must be a positive integer, got True"),
        (DEMO_CFG, 0, "vocab_size must be a positive integer, got 0"),
        (DEMO_CFG, 70_000, "vocab_size 70000 exceeds 65536"),
        ({k: v for k, v in DEMO_CFG.items() if k != "n_head"}, 84, r"missing keys \['n_head'\]"),
        ({**DEMO_CFG, "dropout": 0.1}, 84, r"unknown keys \['dropout'\]"),
    ],
)
def test_build_model_rejects_bad_configs(cfg, vocab, message):
    with pytest.raises(ValueError, match=message):
        build_model(cfg, vocab)


def test_gptconfig_is_the_model_config():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=5)
    model = GPT(cfg)
    assert model.config == cfg and model.config.bias is False
    assert model(torch.zeros(3, 4, dtype=torch.long))[0].shape == (3, 4, 5)
