"""Per-token log-probs (and entropy) from hidden states without materializing (N, V) logits.

    logits = hidden @ weight.T / temperature            (N, V)  -- never held whole
    logprob[n] = logits[n, target[n]] - logsumexp(logits[n])
    entropy[n] = logsumexp(logits[n]) - sum_v softmax(logits[n])_v * logits[n, v]

Implementations, behind `token_logprobs(..., impl="auto")`:
- `reference`: logits -> log_softmax -> gather. Ground truth; holds (N, V) several times.
- `chunked`: PyTorch, a custom autograd function that walks the vocabulary in chunks with an online
  logsumexp in the forward pass and recomputes each chunk's logits in the backward pass, so neither
  pass holds more than (N, chunk) at once. Runs everywhere.
- `triton`: the same algorithm as Triton kernels (kernels/triton_logprob.py), CUDA only.

Gradients (for the chunked backward), with z = logits, p = softmax(z), t = target:
    d logprob_n / d z_nv = 1[v = t_n] - p_nv
    d entropy_n / d z_nv = -p_nv * (z_nv - E_p[z_n])
This module imports torch and nothing of ours.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 4096
IMPLS = ("auto", "chunked", "triton", "reference")


def reference_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden (N, H), weight (V, H), targets (N,) -> logprobs (N,), entropy (N,) or None. fp32 math."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = (hidden.float() @ weight.float().T) / temperature  # (N, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk, with_entropy):
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # fp32 logits, always
            return _ChunkedLogprob._forward(ctx, hidden, weight, targets, temperature, chunk, with_entropy)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, temperature, chunk, with_entropy):
        h = hidden.float()
        N, V = h.shape[0], weight.shape[0]
        m = torch.full((N,), float("-inf"), device=h.device)  # running max
        s = torch.zeros(N, device=h.device)  # sum exp(z - m)
        sz = torch.zeros(N, device=h.device)  # sum exp(z - m) * z (for entropy)
        target_logit = torch.zeros(N, device=h.device)
        for start in range(0, V, chunk):
            end = min(start + chunk, V)
            z = (h @ weight[start:end].float().T) / temperature  # (N, C)
            m_new = torch.maximum(m, z.max(dim=-1).values)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * scale + e.sum(-1)
            if with_entropy:
                sz = sz * scale + (e * z).sum(-1)
            m = m_new
            in_chunk = (targets >= start) & (targets < end)
            idx = (targets - start).clamp(0, end - start - 1)
            target_logit = torch.where(in_chunk, z.gather(-1, idx[:, None]).squeeze(-1), target_logit)
            del z, e
        lse = m + torch.log(s)
        logp = target_logit - lse
        expected_z = sz / s
        entropy = lse - expected_z if with_entropy else None
        ctx.save_for_backward(hidden, weight, targets, lse, expected_z)
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        return (logp, entropy) if with_entropy else (logp, torch.zeros_like(logp))

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        with torch.autocast(device_type=ctx.saved_tensors[0].device.type, enabled=False):
            return _ChunkedLogprob._backward(ctx, grad_logp, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, expected_z = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        h = hidden.float()
        V = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_lp = grad_logp.float() if grad_logp is not None else torch.zeros_like(lse)
        g_ent = grad_entropy.float() if (grad_entropy is not None and ctx.with_entropy) else None
        for start in range(0, V, chunk):
            end = min(start + chunk, V)
            w = weight[start:end].float()
            z = (h @ w.T) / T  # (N, C), recomputed
            p = torch.exp(z - lse[:, None])
            grad_z = -p * g_lp[:, None]  # (N, C)
            if g_ent is not None:
                grad_z -= p * (z - expected_z[:, None]) * g_ent[:, None]
            in_chunk = (targets >= start) & (targets < end)
            rows = in_chunk.nonzero().squeeze(-1)
            grad_z[rows, targets[rows] - start] += g_lp[rows]
            grad_z /= T
            if need_h:
                grad_h += grad_z @ w
            if need_w:
                grad_w[start:end] = grad_z.T @ h
            del z, p, grad_z
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            None, None, None, None,
        )


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `reference_token_logprobs`; peak extra memory O(N x chunk_size)."""
    logp, entropy = _ChunkedLogprob.apply(hidden, weight, targets, float(temperature), int(chunk_size), with_entropy)
    return logp, (entropy if with_entropy else None)


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device) -> str:
    """`auto` -> triton on CUDA with triton installed, else chunked."""
    if impl not in IMPLS:
        raise ValueError(f"logprob impl ({impl}) must be one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if triton_available(device) else "chunked"
    if impl == "triton" and not triton_available(device) and not _triton_interpreting():
        raise RuntimeError("logprob impl 'triton' needs a CUDA device and triton (pip install 'lastmile[gpu]'); use 'auto'")
    return impl


def _triton_interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch: hidden (N, H), weight (V, H), targets (N,) long -> logprobs (N,) fp32, entropy (N,) or None."""
    chosen = resolve_impl(impl, hidden.device)
    if chosen == "reference":
        return reference_token_logprobs(hidden, weight, targets, temperature, with_entropy=with_entropy)
    if chosen == "triton":
        from kernels.triton_logprob import triton_token_logprobs

        return triton_token_logprobs(hidden, weight, targets, temperature, with_entropy=with_entropy)
    return chunked_token_logprobs(hidden, weight, targets, temperature, with_entropy=with_entropy, chunk_size=chunk_size)
