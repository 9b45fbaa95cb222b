""" The α that SDPGOTask's PWA must give, recomputed from `sdpgo_timm.pwa` on the same tapped features and gradients.

`PWAReference` records, beside the task's own hooks, each training step's tapped outputs and the gradients backward
brings them, and feeds the fresh half of each (the second half of the model batch, gradients times the batch size
over the loss scale: per-sample ∂CE/∂F) to a ProximalWeightAssignment of its own with the task's options. A task
that taps other layers, slices the wrong half, forgets to undo the loss scale or whose hooks never fire gives
another α; any α in (0, 1) would pass a range check, as a sigmoid always lies there.
"""
from typing import List, Optional

import torch
import torch.nn as nn

from sdpgo_timm import SDPGOTask
from sdpgo_timm.pwa import ProximalWeightAssignment
from sdpgo_timm.taps import resolve_tap_layers, to_bsc


class PWAReference:
    """Record `model`'s tapped outputs and their gradients while `task` trains it; `step()` after each backward
    returns the α of that step's fresh half. Hook before `task.compile` (tapped modules stay eager); not for
    gradient checkpointing, whose recomputation runs the tapped modules again."""

    def __init__(self, task: SDPGOTask, model: nn.Module):
        self.channels = [chs for _, chs in resolve_tap_layers(model, task.tap_layers)]
        self.nhwc = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'
        self.prefix = getattr(model, 'num_prefix_tokens', 0)
        self.pwa = ProximalWeightAssignment(
            len(self.channels), beta=task.pwa.beta, alpha_min=task.pwa.alpha_min, alpha_max=task.pwa.alpha_max)
        self.features: List[Optional[torch.Tensor]] = [None] * len(self.channels)
        self.grads: List[Optional[torch.Tensor]] = [None] * len(self.channels)
        modules = dict(model.named_modules())
        for i, name in enumerate(task.tap_layers):
            modules[name].register_forward_hook(self._recorder(i))

    def _recorder(self, i: int):
        def record(module, args, output):
            if not output.requires_grad:  # evaluation
                return
            self.features[i] = output.detach()
            output.register_hook(lambda grad: self.grads.__setitem__(i, grad))
        return record

    def step(self, loss_scale: float = 1.0) -> torch.Tensor:
        """α of the fresh half of the step whose backward just ran (its loss was multiplied by `loss_scale`)."""
        z = []
        for i, (feature, grad, chs) in enumerate(zip(self.features, self.grads, self.channels)):
            assert feature is not None and grad is not None, f'tap {i} saw no forward or no gradient'
            fresh = len(feature) // 2
            f = to_bsc(feature[fresh:], chs, self.prefix, self.nhwc)
            g = to_bsc(grad[fresh:], chs, self.prefix, self.nhwc) * (len(feature) / loss_scale)
            z.append(self.pwa.layer_scores(i, f, g)['z'])
        self.features = [None] * len(self.channels)
        self.grads = [None] * len(self.channels)
        return self.pwa.advance(z)
