import importlib.util

import pytest
import torch

from lastmile_kernels.logprob import chunked_token_logprobs, reference_token_logprobs, resolve_impl, token_logprobs


def _inputs(N, V, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, t


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp(min=1e-12))


@pytest.mark.parametrize("N,V,H,temperature,chunk", [
    (1, 7, 3, 1.0, 2), (16, 1000, 32, 1.0, 128), (64, 1001, 16, 0.7, 256),  # V not a multiple of chunk
    (33, 517, 24, 2.0, 517), (8, 300, 8, 1.3, 1000),  # one chunk; chunk larger than V
])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_equals_reference_values_and_grads(N, V, H, temperature, chunk, with_entropy):
    h, w, t = _inputs(N, V, H)
    g_lp, g_ent = torch.randn(N), torch.randn(N)
    lp_ref, ent_ref = reference_token_logprobs(h, w, t, temperature, with_entropy=with_entropy)
    loss = (lp_ref * g_lp).sum() + ((ent_ref * g_ent).sum() if with_entropy else 0)
    gh_ref, gw_ref = torch.autograd.grad(loss, (h, w))
    lp, ent = chunked_token_logprobs(h, w, t, temperature, with_entropy=with_entropy, chunk_size=chunk)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert _rel(lp, lp_ref) < 1e-5
    if with_entropy:
        assert _rel(ent, ent_ref) < 1e-5
    assert _rel(gh, gh_ref) < 1e-5 and _rel(gw, gw_ref) < 1e-5


def test_logprobs_are_normalized():
    h, w, _ = _inputs(4, 50, 8)
    all_targets = torch.arange(50)
    for n in range(4):
        lp, _ = chunked_token_logprobs(h[n].expand(50, -1), w, all_targets, chunk_size=16)
        assert torch.allclose(lp.exp().sum(), torch.tensor(1.0), atol=1e-5)


def test_dispatch_auto_is_chunked_on_cpu():
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    with pytest.raises(ValueError):
        resolve_impl("cuda-magic", torch.device("cpu"))
    h, w, t = _inputs(5, 40, 4)
    a, _ = token_logprobs(h, w, t, impl="auto", chunk_size=16)
    b, _ = token_logprobs(h, w, t, impl="reference")
    assert torch.allclose(a, b, atol=1e-6)


def test_fused_loss_equals_reference_on_tiny_model(tiny_lm, tokenizer):
    """The SFT forward through the fused path gives the HF logits path's log-probs and gradients."""
    from lastmile.data.collate import collate_sft
    from lastmile.data.prompts import TokenizedExample
    from lastmile.models import TokenLogprobModel

    exs = [TokenizedExample("a", tuple(range(5, 25)), tuple(range(30, 40))),
           TokenizedExample("b", tuple(range(7, 15)), tuple(range(50, 55)))]
    b = collate_sft(exs, tokenizer.pad_token_id)
    fused = TokenLogprobModel(tiny_lm, logprob_impl="chunked")
    lp, _ = fused(b.input_ids, b.attention_mask, b.target_mask)
    mask = b.target_mask[:, 1:]
    loss = -(lp * mask).sum() / mask.sum()
    grads = torch.autograd.grad(loss, [p for p in tiny_lm.parameters()])
    logits = tiny_lm(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits.float()
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    ref_loss = -(ref * mask).sum() / mask.sum()
    ref_grads = torch.autograd.grad(ref_loss, [p for p in tiny_lm.parameters()])
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-5
    assert torch.allclose(lp[mask], ref[mask], atol=1e-5)
    assert (lp[~mask] == 0).all()
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) < 1e-4
    # The SFT default: reduction="sum" through the fused linear-loss path.
    summed = fused(b.input_ids, b.attention_mask, b.target_mask, reduction="sum")
    sum_loss = -summed / mask.sum()
    sum_grads = torch.autograd.grad(sum_loss, [p for p in tiny_lm.parameters()])
    assert abs(float(sum_loss.detach()) - float(ref_loss.detach())) < 1e-5
    for g, r in zip(sum_grads, ref_grads):
        assert _rel(g, r) < 1e-4


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@needs_triton
@pytest.mark.parametrize("N,V,H", [(6, 70, 16), (20, 130, 40)])  # V, H not multiples of the tiles
def test_triton_kernel_under_interpreter(monkeypatch, N, V, H):
    """Runs the Triton kernels on CPU with TRITON_INTERPRET=1 (slow: tiny shapes only)."""
    import subprocess
    import sys

    code = f'''
import torch
import lastmile_kernels.triton_logprob as tk
from lastmile_kernels.logprob import reference_token_logprobs
tk.BWD_CHUNK = 32  # several backward chunks, the last one partial
g = torch.Generator().manual_seed(0)
h = torch.randn({N}, {H}, generator=g, requires_grad=True); w = torch.randn({V}, {H}, generator=g, requires_grad=True)
t = torch.randint(0, {V}, ({N},), generator=g); gl = torch.randn({N}, generator=g); ge = torch.randn({N}, generator=g)
lp, ent = tk.triton_token_logprobs(h, w, t, 0.9, with_entropy=True)
gh, gw = torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), (h, w))
rlp, rent = reference_token_logprobs(h, w, t, 0.9, with_entropy=True)
rh, rw = torch.autograd.grad((rlp * gl).sum() + (rent * ge).sum(), (h, w))
rel = lambda a, b: float((a - b).detach().norm() / b.detach().norm())
errs = [rel(lp, rlp), rel(ent, rent), rel(gh, rh), rel(gw, rw)]
assert max(errs) < 1e-5, errs
print("ok", errs)
'''
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}  # read when the kernels are decorated
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_matches_reference_on_gpu():
    h, w, t = (x.cuda() for x in _inputs(512, 49152, 576))
    h.retain_grad()
    lp, ent = token_logprobs(h, w, t, impl="triton", with_entropy=True)
    lp_ref, ent_ref = reference_token_logprobs(h, w, t, with_entropy=True)
    assert _rel(lp, lp_ref) < 1e-4 and _rel(ent, ent_ref) < 1e-4


def test_packed_batch_equals_padded_batch(tiny_lm):
    """Padding-free packing (position ids restart per sequence) gives the padded path's log-probs."""
    from lastmile.data.collate import collate_packed, collate_sft
    from lastmile.data.prompts import TokenizedExample
    from lastmile.models import TokenLogprobModel

    exs = [TokenizedExample("a", tuple(range(5, 25)), tuple(range(30, 40))),
           TokenizedExample("b", tuple(range(7, 15)), tuple(range(50, 55))),
           TokenizedExample("c", tuple(range(100, 103)), tuple(range(60, 62)))]
    padded, packed = collate_sft(exs, pad_id=2), collate_packed(exs)
    model = TokenLogprobModel(tiny_lm)
    lp_pad, _ = model(padded.input_ids, padded.attention_mask, padded.target_mask)
    lp_pack, _ = model(packed.input_ids, packed.attention_mask, packed.target_mask, packed.position_ids)
    a, b = lp_pad[padded.target_mask[:, 1:]], lp_pack[packed.target_mask[:, 1:]]
    assert a.shape == b.shape == (17,) and torch.allclose(a, b, atol=1e-5)
    assert packed.num_processed_tokens == 48 < padded.num_processed_tokens == 90
