"""Per-token log-probs (and entropy) from hidden states without materializing (N, V) logits.

    logits = hidden @ weight.T / temperature            (N, V)  -- never held whole
    logprob[n] = logits[n, target[n]] - logsumexp(logits[n])
    entropy[n] = logsumexp(logits[n]) - sum_v softmax(logits[n])_v * logits[n, v]

Implementations, behind `token_logprobs(..., impl="auto")`:
- `reference`: logits -> log_softmax -> gather. Ground truth; holds (N, V) several times.
- `chunked`: PyTorch, a custom autograd function that walks the vocabulary in chunks with an online
  logsumexp in the forward pass and recomputes each chunk's logits in the backward pass, so neither
  pass holds more than (N, chunk) at once. Runs everywhere.
- `triton`: the same algorithm as Triton kernels (kernels/lastmile_kernels/triton_logprob.py), CUDA only.

`token_logprob_sum` is the fast path for objectives linear in the log-probs (SFT): it forms all
gradients in the forward pass, chunked over rows, with the reference's 3 matmuls.

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
        hs = hidden.float() / temperature  # (N, H); logits = hs @ w.T
        N, V = hs.shape[0], weight.shape[0]
        rows = torch.arange(N, device=hs.device)
        m = torch.full((N,), float("-inf"), device=hs.device)  # running max
        s = torch.zeros(N, device=hs.device)  # sum exp(z - m)
        sz = torch.zeros(N, device=hs.device)  # sum exp(z - m) * z (for entropy)
        target_logit = torch.zeros(N, device=hs.device)
        for start in range(0, V, chunk):
            end = min(start + chunk, V)
            z = hs @ weight[start:end].float().T  # (N, C)
            in_chunk = (targets >= start) & (targets < end)
            idx = (targets - start).clamp(0, end - start - 1)
            target_logit = torch.where(in_chunk, z[rows, idx], target_logit)
            m_new = torch.maximum(m, z.max(dim=-1).values)
            scale = torch.exp(m - m_new)
            if with_entropy:
                e = torch.exp(z - m_new[:, None])
                sz = sz * scale + (e * z).sum(-1)
                s = s * scale + e.sum(-1)
                del e
            else:
                s = s * scale + z.sub_(m_new[:, None]).exp_().sum(-1)  # in place: no second buffer
            m = m_new
            del z
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
        hs = hidden.float() / T
        V = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hs) if need_h else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g_lp = grad_logp.float() if grad_logp is not None else torch.zeros_like(lse)
        g_ent = grad_entropy.float() if (grad_entropy is not None and ctx.with_entropy) else None
        for start in range(0, V, chunk):
            end = min(start + chunk, V)
            w = weight[start:end].float()
            z = hs @ w.T  # (N, C), recomputed: the one chunk-sized buffer (two with entropy)
            if g_ent is not None:
                centered = z - expected_z[:, None]  # z - E_p[z]
                p = z.sub_(lse[:, None]).exp_()  # in place
                grad_z = p.mul_(-(g_lp[:, None] + g_ent[:, None] * centered))
                del centered
            else:
                grad_z = z.sub_(lse[:, None]).exp_().mul_(-g_lp[:, None])  # -g * p, in place
            in_chunk = ((targets >= start) & (targets < end)).nonzero().squeeze(-1)
            grad_z[in_chunk, targets[in_chunk] - start] += g_lp[in_chunk]
            if need_h:
                grad_h.addmm_(grad_z, w)
            if need_w:
                torch.mm(grad_z.T, hs, out=grad_w[start:end])
            del z, grad_z
        if need_h:
            grad_h /= T
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


class _LinearLogprobSum(torch.autograd.Function):
    """sum_n coef_n * logprob_n with every gradient computed in the forward pass.

    The objective is linear in the log-probs, so the upstream gradient is one scalar and the
    gradients can be formed while each row chunk's logits are at hand: 3 matmuls in all (logits,
    d hidden, d weight), like the reference, instead of the 4 that a per-token function with an
    unknown upstream gradient needs (it must recompute the logits in backward). Rows are chunked,
    each chunk holds (rows, V) once, reused in place for exp, softmax and d logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, coef, temperature, chunk_rows):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hs = hidden.float() / temperature  # (N, H)
            w = weight.float()  # (V, H)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hs) if need_h else None
            grad_w = torch.zeros_like(w) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hs.device)
            c = coef.float()
            for r0 in range(0, hs.shape[0], chunk_rows):
                h_c, t_c, c_c = hs[r0 : r0 + chunk_rows], targets[r0 : r0 + chunk_rows], c[r0 : r0 + chunk_rows]
                rows = torch.arange(h_c.shape[0], device=hs.device)
                z = h_c @ w.T  # (n, V)
                m = z.max(dim=-1).values
                target_logit = z[rows, t_c]
                z.sub_(m[:, None]).exp_()  # e = exp(z - m)
                s = z.sum(-1)
                total += (c_c * (target_logit - m - torch.log(s))).sum()
                if not (need_h or need_w):
                    continue
                z.mul_((-c_c / s)[:, None])  # -coef * softmax
                z[rows, t_c] += c_c  # d/dz of coef * logprob = coef * (onehot - p)
                if need_h:
                    torch.mm(z, w, out=grad_h[r0 : r0 + chunk_rows])
                if need_w:
                    grad_w.addmm_(z.T, h_c)
                del z
            if need_h:
                grad_h /= temperature
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None


def token_logprob_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor | None = None,
    temperature: float = 1.0, *, impl: str = "auto", chunk_rows: int = 1024,
) -> torch.Tensor:
    """Scalar sum_n coef_n * logprob_n (coef defaults to 1): the fast path for objectives linear in
    the log-probs (SFT's NLL). hidden (N, H), weight (V, H), targets (N,), coef (N,) -> scalar.
    `reference` materializes the logits; any other impl uses the fused row-chunked function."""
    if coef is None:
        coef = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    if impl == "reference":
        logp, _ = reference_token_logprobs(hidden, weight, targets, temperature)
        return (logp * coef).sum()
    resolve_impl(impl, hidden.device)  # validates the name
    return _LinearLogprobSum.apply(hidden, weight, targets, coef, float(temperature), int(chunk_rows))


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
        from lastmile_kernels.triton_logprob import triton_token_logprobs

        return triton_token_logprobs(hidden, weight, targets, temperature, with_entropy=with_entropy)
    return chunked_token_logprobs(hidden, weight, targets, temperature, with_entropy=with_entropy, chunk_size=chunk_size)
