"""Proximal Weight Assignment (PWA): gradient-driven per-sample distillation weights α.

For each tapped layer, from the features F (B, S, C) of the fresh half and ∂L_CE/∂F:
channel importance w = mean_s |G|, proximal threshold ŵ = max(w − λ_t, 0) with an
adaptive λ_t (EMA of the mean importance), a Grad-CAM-like importance map
A = |Σ_k ŵ_k F_k| whose mean energy e is standardised by running moments, and finally
α = sigmoid(mean over layers of the z-scores), clamped. Knows nothing of models or data.
See docs/METHOD.md, section 2, for each choice made where the poster is silent.
"""
from typing import Callable, Dict, List, Optional

import torch

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def channel_importance(grad: torch.Tensor) -> torch.Tensor:
    """w_{i,k} = mean over positions of |∂L/∂F_{i,s,k}|: (B, S, C) -> (B, C), fp32."""
    return grad.float().abs().mean(dim=1)


def prox(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Proximal (soft-threshold) operator for non-negative w: w − λ where w > λ, else 0."""
    return (w - lam).clamp_min(0.0)


def importance_energy(features: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """e_i = mean_s |Σ_k ŵ_{i,k} F_{i,s,k}|: (B, S, C), (B, C) -> (B,), fp32."""
    amap = torch.einsum('bsc,bc->bs', features.float(), w_hat).abs()
    return amap.mean(dim=1)


class LayerState:
    """Running statistics of one tapped layer: threshold λ, moments (μ, σ²) of e, update count.

    Kept as tensors and updated with `torch.where` so that a step whose gradients are not
    finite (AMP fp16 overflow) leaves the state untouched without a host sync.
    """

    def __init__(self):
        self.lam = self.mean = self.var = self.count = None

    def ensure(self, like: torch.Tensor) -> None:
        if self.count is None:
            self.lam, self.mean, self.var, self.count = (like.new_zeros((), dtype=torch.float32) for _ in range(4))

    def state_dict(self) -> Dict[str, Optional[torch.Tensor]]:
        return dict(lam=self.lam, mean=self.mean, var=self.var, count=self.count)

    def load_state_dict(self, state: Dict[str, Optional[torch.Tensor]]) -> None:
        self.lam, self.mean, self.var, self.count = state['lam'], state['mean'], state['var'], state['count']


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ProximalWeightAssignment:
    """PWA state for L tapped layers: turns (features, gradients) into per-sample α.

    Args:
        num_layers: number of tapped layers, each with its own λ, μ, σ.
        beta: EMA rate of λ and of the moments (β in [0, 1)).
        alpha_min, alpha_max: clamp of the final α.
        eps: added to σ in the z-score.
        reduce_mean: maps a tensor of batch means to their mean over processes
            (identity when not distributed) so that every rank holds the same state.
    """

    def __init__(
            self,
            num_layers: int,
            beta: float = 0.9,
            alpha_min: float = 0.0,
            alpha_max: float = 1.0,
            eps: float = 1e-6,
            reduce_mean: Optional[ReduceFn] = None,
    ):
        self.beta = beta
        self.alpha_min = alpha_min
        self.alpha_max = alpha_max
        self.eps = eps
        self.reduce_mean = reduce_mean or _identity
        self.layers = [LayerState() for _ in range(num_layers)]
        self.steps = 0

    def _ema(self, old: torch.Tensor, new: torch.Tensor, count: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """β·old + (1 − β)·new, `new` itself at the first update, `old` when the batch is not ok."""
        updated = torch.where(count > 0, self.beta * old + (1.0 - self.beta) * new, new)
        return torch.where(ok, updated, old)

    def layer_scores(self, layer: int, features: torch.Tensor, grad: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Update layer `layer` from one batch and return its z-scores and prox sparsity.

        features, grad: (B, S, C); grad must already be ∂CE_i/∂F_i per sample (loss
        averaging and loss scaling undone by the caller). A batch with non-finite
        gradients (on any process) leaves the state as it was and scores z = 0 (α = 0.5).
        """
        state = self.layers[layer]
        w = channel_importance(grad)
        state.ensure(w)
        w_mean = self.reduce_mean(w.mean())
        ok = torch.isfinite(w_mean)
        w = torch.where(ok, w, torch.zeros_like(w))
        lam = self._ema(state.lam, w_mean, state.count, ok)
        w_hat = prox(w, lam)
        e = importance_energy(features, w_hat)
        batch_mean, batch_sq = self.reduce_mean(torch.stack([e.mean(), (e * e).mean()])).unbind()
        batch_var = (batch_sq - batch_mean * batch_mean).clamp_min(0.0)
        ok = ok & torch.isfinite(batch_sq)
        state.mean = self._ema(state.mean, batch_mean, state.count, ok)
        state.var = self._ema(state.var, batch_var, state.count, ok)
        state.lam = torch.where(ok, lam, state.lam)
        state.count = state.count + ok.float()
        z = (e - state.mean) / (state.var.sqrt() + self.eps)
        z = torch.where(ok & (state.count > 0), z, torch.zeros_like(z))
        sparsity = (w_hat == 0).float().mean()
        return dict(z=z, sparsity=sparsity)

    def advance(self, z_per_layer: List[torch.Tensor]) -> torch.Tensor:
        """α_i = clamp(sigmoid(mean over layers of z_i)); counts one PWA step."""
        self.steps += 1
        z = torch.stack(z_per_layer).mean(dim=0)
        return torch.sigmoid(z).clamp(self.alpha_min, self.alpha_max)

    def state_dict(self) -> Dict:
        return dict(steps=self.steps, layers=[s.state_dict() for s in self.layers])

    def load_state_dict(self, state: Dict) -> None:
        if len(state['layers']) != len(self.layers):
            raise ValueError(
                f"PWA state has {len(state['layers'])} layers, this task taps {len(self.layers)}: "
                "resume with the same --sdpgo-layers as the saved run.")
        self.steps = state['steps']
        for layer, layer_state in zip(self.layers, state['layers']):
            layer.load_state_dict(layer_state)
