"""Triton implementation of lastmile_kernels.logprob (CUDA; correctness-testable with TRITON_INTERPRET=1).

Forward: one fused kernel. Each program takes BLOCK_N rows, walks the vocabulary in BLOCK_V tiles,
computes the tile's logits with tl.dot over BLOCK_H slices of the hidden size, and keeps an online
logsumexp (running max m, sum s, and sum of e*z for the entropy) plus the target's logit. Nothing of
size (N, V) is written.

Backward: per vocabulary chunk, the chunk's logits are recomputed with one matmul into a single
(N, chunk) buffer, a fused Triton kernel turns them in place into d loss / d logits
(  g_lp * (1[v = t] - p) - g_ent * p * (z - E[z])  ) / T, and two matmuls accumulate the hidden
and weight gradients. Same math as the chunked PyTorch version (see kernels/lastmile_kernels/logprob.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BWD_CHUNK = 8192


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, tlogit_ptr, ez_ptr, N, V, H, inv_temp,
                stride_hn, stride_wv, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(t_ptr + rows, mask=row_ok, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)
    tlogit = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        z = acc * inv_temp
        z = tl.where(col_ok[None, :], z, -1.0e30)  # finite, so e * z is 0 (not nan) on padding columns
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * scale + tl.sum(e, axis=1)
        sz = sz * scale + tl.sum(e * z, axis=1)
        m = m_new
        hit = cols[None, :] == targets[:, None]
        tlogit += tl.sum(tl.where(hit, z, 0.0), axis=1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(tlogit_ptr + rows, tlogit, mask=row_ok)
    tl.store(ez_ptr + rows, sz / s, mask=row_ok)


@triton.jit
def _grad_logits_kernel(z_ptr, t_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, C, v0, inv_temp, stride_zn,
                        HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """In place: z (N, C) logits of vocab columns [v0, v0 + C) -> d loss / d (h @ w.T)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < N)[:, None] & (cols < C)[None, :]
    ptrs = z_ptr + rows[:, None] * stride_zn + cols[None, :]
    z = tl.load(ptrs, mask=ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=rows < N, other=0.0)
    t = tl.load(t_ptr + rows, mask=rows < N, other=-1)
    p = tl.exp(z - lse[:, None])
    onehot = tl.where((cols[None, :] + v0) == t[:, None], 1.0, 0.0)
    g = g_lp[:, None] * (onehot - p)
    if HAS_ENT:
        ez = tl.load(ez_ptr + rows, mask=rows < N, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=rows < N, other=0.0)
        g -= g_ent[:, None] * p * (z - ez[:, None])
    tl.store(ptrs, g * inv_temp, mask=ok)


def _forward_stats(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, temperature: float):
    N, H = h.shape
    V = w.shape[0]
    lse, tlogit, ez = (torch.empty(N, dtype=torch.float32, device=h.device) for _ in range(3))
    BLOCK_N, BLOCK_V, BLOCK_H = 16, 64, 32
    _fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
        h, w, t, lse, tlogit, ez, N, V, H, 1.0 / temperature, h.stride(0), w.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
    )
    return lse, tlogit, ez


class _TritonLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy):
        h, w = hidden.contiguous(), weight.contiguous()
        lse, tlogit, ez = _forward_stats(h, w, targets.contiguous(), temperature)
        ctx.save_for_backward(h, w, targets, lse, ez)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        entropy = lse - ez
        return tlogit - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, w, t, lse, ez = ctx.saved_tensors
        N, V = h.shape[0], w.shape[0]
        hf = h.float()
        g_lp = (grad_logp if grad_logp is not None else torch.zeros_like(lse)).float().contiguous()
        has_ent = ctx.with_entropy and grad_entropy is not None
        g_ent = grad_entropy.float().contiguous() if has_ent else g_lp
        grad_h = torch.zeros_like(hf)
        grad_w = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        for v0 in range(0, V, BWD_CHUNK):
            wc = w[v0 : v0 + BWD_CHUNK].float()
            z = (hf @ wc.T) / ctx.temperature  # (N, C): the only chunk-sized buffer
            C = z.shape[1]
            _grad_logits_kernel[(triton.cdiv(N, 32), triton.cdiv(C, 128))](
                z, t, lse, ez, g_lp, g_ent, N, C, v0, 1.0 / ctx.temperature, z.stride(0),
                HAS_ENT=has_ent, BLOCK_N=32, BLOCK_C=128,
            )
            grad_h += z @ wc
            grad_w[v0 : v0 + C] = z.T @ hf
        return grad_h.to(h.dtype), grad_w.to(w.dtype), None, None, None


def triton_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden (N, H), weight (V, H), targets (N,) -> logprobs (N,) fp32, entropy (N,) or None."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logp, entropy = _TritonLogprob.apply(hidden, weight, targets, float(temperature), with_entropy)
    return logp, (entropy if with_entropy else None)
