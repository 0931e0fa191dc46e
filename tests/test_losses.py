import torch

from lastmile.algorithms.losses import masked_mean, masked_sum, token_mean_loss


def test_masked_reductions_hand_values():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, False, True]])
    assert masked_sum(v, m) == 10.0 and masked_mean(v, m) == 10.0 / 3
    assert masked_mean(v, torch.zeros_like(m)) == 0.0


def test_token_mean_loss_only_counts_target_tokens():
    logp = torch.tensor([[-1.0, -2.0, -100.0], [-0.5, -100.0, -100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = token_mean_loss(-masked_sum(logp, mask), global_tokens=3, grad_accum=1, world_size=1)
    assert torch.isclose(loss, torch.tensor(3.5 / 3))
    # 2 accumulation steps x 2 ranks: the scale DeepSpeed divides out is multiplied back in.
    assert torch.isclose(token_mean_loss(torch.tensor(3.5), global_tokens=7, grad_accum=2, world_size=2), torch.tensor(2.0))


def test_micro_batching_gives_the_same_gradient():
    """1 x 4 and 4 x 1 accumulation (DeepSpeed divides each micro-loss by the accumulation steps)
    give the gradient of the token-mean over the global batch, whatever the per-row token counts."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(4, 6, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]]).bool()

    def logp(rows):
        return torch.nn.functional.logsigmoid(x[rows] @ w)

    total = int(mask.sum())
    loss = token_mean_loss(-masked_sum(logp(slice(0, 4)), mask), global_tokens=total, grad_accum=1, world_size=1)
    (g_full,) = torch.autograd.grad(loss, w)
    g_acc = torch.zeros(5)
    for r in range(4):
        loss = token_mean_loss(-masked_sum(logp(slice(r, r + 1)), mask[r : r + 1]), global_tokens=total, grad_accum=4,
                        world_size=1)
        (g,) = torch.autograd.grad(loss / 4, w)  # what DeepSpeed's backward does with 4 accumulation steps
        g_acc += g
    assert torch.allclose(g_full, g_acc, atol=1e-6)
    expected = -(logp(slice(0, 4))[mask]).sum() / total
    (g_expected,) = torch.autograd.grad(expected, w)
    assert torch.allclose(g_full, g_expected, atol=1e-6)
