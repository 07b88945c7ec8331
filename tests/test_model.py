"""Model shapes, sizes, the fused output loss and causal masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qknorm.model import build_model, kernels
from qknorm.model.lm_loss import lm_loss
from qknorm.model.rope import rope_tables
from qknorm.model.stack import StackedModel

from .conftest import compose_config
from .test_attention import ref_attention


@pytest.mark.parametrize("size,vocab,low,high", [("nano", 2048, 0.15e6, 0.3e6), ("tiny", 2048, 0.9e6, 1.3e6),
                                                 ("small", 2048, 4.5e6, 6e6), ("base", 2048, 17e6, 23e6),
                                                 ("gpt2_small", 32768, 105e6, 115e6), ("gpt2_medium", 32768, 330e6, 345e6)])
def test_model_sizes(size, vocab, low, high):
    cfg = compose_config([f"model={size}", f"data.vocab_size={vocab}"])
    with torch.device("meta"):  # shapes only: the GPU sizes would take seconds to initialize
        model = build_model(cfg, vocab_size=vocab)
    n = model.num_params()
    assert low <= n <= high, f"{size}: {n} parameters"
    if size.startswith("gpt2"):
        assert model.cfg.dim_head == 64


# every path of the LM-head loss, forced on the CPU: cache-sized chunks (the last one partial), one chunk
# for all rows (a GPU's large chunks), and the composite loss that torch.compile fuses
LOSS_PATHS = {"chunks_of_64": 64, "one_chunk": 1 << 20, "composite": None}


@pytest.mark.parametrize("path", LOSS_PATHS)
@pytest.mark.parametrize("z_loss,softcap", [(0.0, None), (1e-2, None), (1e-2, 3.0)])
def test_every_loss_path_matches_cross_entropy_in_float64(path, z_loss, softcap):
    torch.manual_seed(0)
    b, t, d, vocab = 3, 500, 16, 300
    hidden = torch.randn(b, t, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (b, t))
    with kernels.force(lm_loss_chunk_rows=LOSS_PATHS[path]):
        total, nats, z_sq = lm_loss(hidden, weight, targets, z_loss, softcap)
    gh, gw = torch.autograd.grad(3.0 * total, [hidden, weight])
    assert nats.shape == (b, t) and not nats.requires_grad and not z_sq.requires_grad

    logits = hidden @ weight.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref_nats = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    ref_z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
    ref_total = ref_nats.mean() + z_loss * ref_z
    rh, rw = torch.autograd.grad(3.0 * ref_total, [hidden, weight])
    for got, want in ((total, ref_total), (nats, ref_nats.float()), (z_sq, ref_z.float()), (gh, rh), (gw, rw)):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-9)


def test_loss_path_by_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert kernels.lm_loss_chunk_rows(cpu, 2048) == 512  # 4 MB of fp32 logits: cache-sized
    assert kernels.lm_loss_chunk_rows(gpu, 32768) == 4096  # 4 launches for 16 x 1024 tokens, not 512
    assert kernels.norm_rope_kernel(cpu) == "fused" and kernels.norm_rope_kernel(gpu) == "composite"
    assert kernels.softcap_kernel(cpu, "auto") == "chunked" and kernels.softcap_kernel(gpu, "auto") == "flex"
    with kernels.force(lm_loss_chunk_rows=None, norm_rope="composite"):
        assert kernels.lm_loss_chunk_rows(cpu, 2048) is None and kernels.norm_rope_kernel(cpu) == "composite"
    assert kernels.lm_loss_chunk_rows(cpu, 2048) == 512
    with pytest.raises(ValueError, match="unknown kernel choices"):
        with kernels.force(loss="composite"):
            pass
    for bad, match in ((dict(stack="vamp"), "stack='vamp': one of vmap, loop"), (dict(softcap="sdpa"), "one of chunked, flex"),
                       (dict(norm_rope="fuse"), "one of fused, composite"), (dict(lm_loss_chunk_rows=0), "a positive number")):
        with pytest.raises(ValueError, match=match), kernels.force(**bad):
            pass


def test_under_fp16_autocast_the_head_loss_gradient_survives_the_loss_scale():
    """fp16 mixed precision scales the loss before its backward so that small gradients survive fp16. The head
    loss's path is chosen by the autocast dtype: its gradient of the hidden states, scaled by 2^16 and back, is
    within fp16's rounding of a float64 reference (the fused loss, which computes and casts its gradients in the
    forward before any scale, loses the smallest entries: 16k tokens give entries near 1e-7)."""
    assert kernels.lm_loss_chunk_rows(torch.device("cuda"), 32768, torch.float16) is None
    assert kernels.lm_loss_chunk_rows(torch.device("cuda"), 32768, torch.bfloat16) == 4096
    torch.manual_seed(0)
    n, d, vocab = 16384, 32, 512
    hidden = torch.randn(n, d, requires_grad=True)
    weight, targets = torch.randn(vocab, d) * 0.02, torch.randint(0, vocab, (n,))
    want, = torch.autograd.grad(lm_loss(hidden.double(), weight.double(), targets)[0], hidden)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lm_loss(hidden, weight, targets)[0]
    got, = torch.autograd.grad(loss * 2.0 ** 16, hidden)
    err = float((got / 2.0 ** 16 - want).norm() / want.norm())
    assert err < 1e-3, err


@pytest.mark.parametrize("path", LOSS_PATHS)
def test_loss_without_grad_needs_no_backward_buffers(path):
    hidden, weight = torch.randn(10, 4), torch.randn(7, 4)
    with torch.no_grad(), kernels.force(lm_loss_chunk_rows=LOSS_PATHS[path]):
        total, nats, _ = lm_loss(hidden, weight, torch.zeros(10, dtype=torch.long))
    assert nats.shape == (10,) and torch.isfinite(total)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_a_later_token_cannot_change_an_earlier_output(mlp):
    cfg = compose_config(["model=nano", f"model.mlp={mlp}", "model.n_kv_heads=1", "data.seq_len=32"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=500).eval()
    idx = torch.randint(0, 500, (3, 32))
    with torch.no_grad():
        base = model(idx)
        for t in (0, 7, 31):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 500
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t])
            assert (out[:, t:] - base[:, t:]).abs().max() > 0


def test_tied_and_untied_embeddings():
    tied = build_model(compose_config(["model=nano"]), 400)
    untied = build_model(compose_config(["model=nano", "model.tie_embeddings=false"]), 400)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 400 * 64


def test_wortsman_init_scales_with_fan_in():
    model = build_model(compose_config(["model=small"]), 2048)
    w = model.blocks[0].mlp.fc2.weight  # fan_in = hidden
    assert w.std().item() == pytest.approx(w.shape[1] ** -0.5 * 0.88, rel=0.05)  # truncation at 2 sd: x0.88
    assert model.embed.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].mlp.fc1.bias is None


def _ref_rms(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight.detach()


def _ref_forward(model, idx):
    """The pre-norm SwiGLU model in plain float64 from the formulas (attention: test_attention.ref_attention,
    with RoPE angles computed in float64)."""
    eps = model.cfg.norm_eps
    x = model.embed.weight.detach()[idx]
    for block in model.blocks:
        x = x + ref_attention(block.attn, model.attention_cfg, _ref_rms(x, block.attn_norm.weight, eps))
        h = _ref_rms(x, block.mlp_norm.weight, eps)
        gate, up = block.mlp.fc1.weight.detach().chunk(2, dim=0)
        x = x + (F.silu(h @ gate.T) * (h @ up.T)) @ block.mlp.fc2.weight.detach().T
    return _ref_rms(x, model.norm.weight, eps) @ model.lm_head.weight.detach().T


def test_a_float64_model_rotates_by_float64_angles():
    """.double() (what trainer.precision=64-true does) recomputes the RoPE tables from float64 angles rather than
    upcasting float32 ones; a float32 model's tables are the float64 ones rounded once, as they always were."""
    t = 16
    cfg = compose_config(["model=nano", "model.n_heads=4", "model.n_kv_heads=2", "attention=qwen3", f"data.seq_len={t}"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=300)
    cos64, sin64 = rope_tables(t, model.cfg.dim_head, model.cfg.rope_theta)
    assert model.rope_cos.dtype == torch.float32
    assert torch.equal(model.rope_cos, cos64.float()) and torch.equal(model.rope_sin, sin64.float())
    model = model.double().eval()
    assert torch.equal(model.rope_cos, cos64) and torch.equal(model.rope_sin, sin64)
    with torch.no_grad():
        for p in model.parameters():  # gains away from 1, so the norms' gains are part of the check
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
        idx = torch.randint(0, 300, (2, t))
        torch.testing.assert_close(model(idx), _ref_forward(model, idx), rtol=1e-12, atol=1e-12)
    # through float32 and back: the tables are computed again, not carried through float32
    assert torch.equal(model.float().rope_cos, cos64.float()) and torch.equal(model.double().rope_sin, sin64)
    # a stack reads the same tables: they are not stacked (and cast) with the members' state
    stack = StackedModel([model]).double()
    assert "rope_cos" not in stack.buffer_names and torch.equal(stack.member_views()[0].rope_cos, cos64)
