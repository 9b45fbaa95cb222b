"""PWA formulas checked against direct computations on hand-made tensors."""
import math

import pytest
import torch

from sdpgo_timm.pwa import ProximalWeightAssignment, channel_importance, importance_energy, prox


def test_channel_importance_is_mean_abs_over_positions():
    g = torch.tensor([[[1.0, -2.0], [-3.0, 4.0]]])  # (B=1, S=2, C=2)
    torch.testing.assert_close(channel_importance(g), torch.tensor([[2.0, 3.0]]))


def test_prox_soft_thresholds():
    w = torch.tensor([0.1, 0.5, 0.3, 0.31])
    expected = torch.tensor([0.0 if v <= 0.3 else v - 0.3 for v in w.tolist()])
    torch.testing.assert_close(prox(w, torch.tensor(0.3)), expected)


def test_importance_energy_is_abs_weighted_channel_sum():
    f = torch.tensor([[[1.0, 2.0], [-3.0, 1.0]]])
    w_hat = torch.tensor([[0.5, 0.0]])
    # positions: |0.5*1| = 0.5, |0.5*-3| = 1.5 -> mean 1.0
    torch.testing.assert_close(importance_energy(f, w_hat), torch.tensor([1.0]))


def _direct_pwa(batches, beta, eps=1e-6):
    """Reference PWA for one layer, step by step with Python floats."""
    lam = mean = var = None
    zs = []
    for f, g in batches:
        w = g.abs().mean(1)
        wm = w.mean().item()
        lam = wm if lam is None else beta * lam + (1 - beta) * wm
        w_hat = (w - lam).clamp_min(0)
        e = [abs_mean for abs_mean in (f * w_hat[:, None, :]).sum(-1).abs().mean(1).tolist()]
        bm = sum(e) / len(e)
        bv = sum(x * x for x in e) / len(e) - bm * bm
        mean = bm if mean is None else beta * mean + (1 - beta) * bm
        var = bv if var is None else beta * var + (1 - beta) * bv
        zs.append([(x - mean) / (math.sqrt(var) + eps) for x in e])
    return lam, mean, var, zs


def test_lambda_moments_and_z_match_direct_computation():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 5, 3), torch.randn(4, 5, 3)) for _ in range(3)]
    pwa = ProximalWeightAssignment(1, beta=0.9)
    zs = [pwa.layer_scores(0, f, g)['z'] for f, g in batches]
    lam, mean, var, ref_z = _direct_pwa(batches, 0.9)
    state = pwa.layers[0]
    assert state.lam.item() == pytest.approx(lam, rel=1e-5)
    assert state.mean.item() == pytest.approx(mean, rel=1e-5)
    assert state.var.item() == pytest.approx(var, rel=1e-4)
    for z, ref in zip(zs, ref_z):
        torch.testing.assert_close(z, torch.tensor(ref), rtol=1e-4, atol=1e-5)


def test_alpha_is_clamped_sigmoid_of_layer_mean():
    pwa = ProximalWeightAssignment(2, alpha_min=0.1, alpha_max=0.8)
    z = [torch.tensor([0.0, 4.0, -6.0]), torch.tensor([2.0, 4.0, -2.0])]
    expected = [min(max(1 / (1 + math.exp(-m)), 0.1), 0.8) for m in (1.0, 4.0, -4.0)]
    torch.testing.assert_close(pwa.advance(z), torch.tensor(expected))
    assert pwa.steps == 1


def test_sparsity_is_share_of_zero_weights():
    pwa = ProximalWeightAssignment(1)
    g = torch.zeros(2, 1, 4)
    g[0, 0, 0] = 8.0  # w = [[8,0,0,0],[0,0,0,0]], λ = 1 -> one non-zero of eight
    out = pwa.layer_scores(0, torch.ones(2, 1, 4), g)
    assert out['sparsity'].item() == pytest.approx(7 / 8)


def test_non_finite_gradients_leave_state_and_give_neutral_z():
    torch.manual_seed(0)
    pwa = ProximalWeightAssignment(1)
    pwa.layer_scores(0, torch.randn(3, 2, 2), torch.randn(3, 2, 2))
    before = {k: v.clone() for k, v in pwa.layers[0].state_dict().items()}
    bad = torch.full((3, 2, 2), float('inf'))
    out = pwa.layer_scores(0, torch.randn(3, 2, 2), bad)
    assert torch.equal(out['z'], torch.zeros(3))
    for k, v in pwa.layers[0].state_dict().items():
        assert torch.equal(v, before[k]), k


def test_first_batch_non_finite_keeps_state_uninitialised():
    pwa = ProximalWeightAssignment(1)
    pwa.layer_scores(0, torch.randn(2, 2, 2), torch.full((2, 2, 2), float('nan')))
    assert pwa.layers[0].count.item() == 0
    f, g = torch.randn(2, 2, 2), torch.randn(2, 2, 2)
    pwa.layer_scores(0, f, g)
    assert pwa.layers[0].lam.item() == pytest.approx(g.abs().mean(1).mean().item())


def test_state_round_trip():
    torch.manual_seed(0)
    a, b = ProximalWeightAssignment(2), ProximalWeightAssignment(2)
    for layer in range(2):
        a.layer_scores(layer, torch.randn(3, 4, 2), torch.randn(3, 4, 2))
    b.load_state_dict(a.state_dict())
    f, g = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    torch.testing.assert_close(a.layer_scores(1, f, g)['z'], b.layer_scores(1, f, g)['z'])


def test_state_with_other_layer_count_is_rejected():
    with pytest.raises(ValueError, match='sdpgo-layers'):
        ProximalWeightAssignment(1).load_state_dict(ProximalWeightAssignment(2).state_dict())


def test_distributed_reduce_is_used_for_batch_statistics():
    calls = []

    def reduce_mean(x):
        calls.append(x.shape)
        return x

    ProximalWeightAssignment(1, reduce_mean=reduce_mean).layer_scores(0, torch.randn(2, 3, 2), torch.randn(2, 3, 2))
    assert calls == [torch.Size([]), torch.Size([2])]
