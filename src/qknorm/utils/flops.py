"""Model FLOPs per token and the machine's matmul rate: MFU in the benchmarks, duration estimates of sweeps.

FLOPs are counted the same way for every implementation (PaLM, appendix B): 6 x (weight-matrix
parameters, the LM head included, the input embedding excluded) per token for forward and backward, plus
12 x layers x seq_len x attention width for the attention scores and weighted values (the full square:
the causal half is not discounted).
"""

from __future__ import annotations

import time


def model_flops_per_token(m, vocab: int, seq: int) -> int:
    """Training FLOPs per token of a model of ModelConfig `m`."""
    d, hd = m.d_model, m.dim_head
    attn_width = m.n_heads * hd
    qkv = d * (m.n_heads + 2 * m.kv_heads) * hd
    mlp = (3 if m.mlp == "swiglu" else 2) * d * m.hidden
    matrices = m.n_layers * (qkv + attn_width * d + mlp) + vocab * d
    return 6 * matrices + 12 * m.n_layers * seq * attn_width


def matmul_peak(device: str = "cpu", threads: int | None = None, precision: str = "fp32", n: int | None = None,
                repeats: int = 10, cpu_clock: bool = False) -> float:
    """Best-of-N GFLOP/s of a square matmul: fp32 2048^2 on CPU, bf16 8192^2 on GPU by default. With
    cpu_clock (CPU only), timed by the process's CPU time shared over its threads: what the cores do when
    the matmul has them, whatever else keeps them busy (the load is then accounted for apart)."""
    import torch  # here, not at the top: listing a sweep imports the FLOP counts and need not load torch

    if threads:
        torch.set_num_threads(threads)
    n = n or (8192 if device == "cuda" else 2048)
    dtype = torch.bfloat16 if device == "cuda" and precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    clock = time.process_time if cpu_clock and device == "cpu" else time.perf_counter
    share = torch.get_num_threads() if clock is time.process_time else 1  # CPU seconds of all threads together
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        a @ b
        sync()
        best = min(best, (clock() - t0) / share)
    return 2 * n**3 / best / 1e9


def device_name(device) -> str:
    """What a device is, for reports: the GPU's name on CUDA, the processor (and torch version) on CPU."""
    import platform

    import torch  # here, not at the top: as in matmul_peak

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"
