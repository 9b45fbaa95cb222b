"""DLB (Shen et al., CVPR 2022): self-distillation from the last mini-batch.

DLB is SIL with the full teacher distribution, α fixed at 1, additive weighting and τ = 3
(`DLB_PRESET`). The 'dlb' preset runs it on SDPGOTask's one forward of [replay; fresh];
`DLBTwoForwardTask` runs it as the authors' code does, one forward per half, so that its
step cost can be compared with the one-forward preset.
"""
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from ..sil import sil_loss
from ..task import SDPGOTask

DLB_PRESET: Dict[str, Any] = dict(temperature=3.0, topk=-1, alpha_mode='fixed', alpha=1.0, weighting='additive')


class DLBTwoForwardTask(SDPGOTask):
    """DLB with two forwards per step: the fresh half, then the re-augmented replay half.

    The caller passes [replay views; fresh] with their dataset indices, as in SDPGOTask's
    views mode, and the replay half is checked the same way. The fresh half's forward gives
    its CE and the teacher p = softmax(z / τ) cached for the next step; the replay half's
    forward gives CE + τ²·KL(p ‖ softmax(z / τ)) against the teacher cached one step earlier.
    The loss is the SUM of the two halves' mean losses, i.e. twice the one-forward preset's
    mean over the batch; each half also gets its own BatchNorm batch statistics.

    Takes SDPGOTask's arguments; DLB's values (`DLB_PRESET`, replay='views') override them.
    """

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **{**kwargs, **DLB_PRESET, 'replay': 'views'})

    def forward(
            self,
            input: torch.Tensor,
            target: torch.Tensor,
            index: Optional[torch.Tensor] = None,
            loss_scale: Union[float, torch.Tensor] = 1.0,
    ) -> Dict[str, torch.Tensor]:
        """One DLB step; returns the same entries as SDPGOTask.forward (output: [replay; fresh])."""
        input, target, num_replay = self._batch(input, target, index)
        fresh_logits, _ = self.trainable_module(input[num_replay:])
        fresh_ce = self._per_sample_loss(fresh_logits, target[num_replay:])
        loss, logits, ce = fresh_ce.mean(), fresh_logits, fresh_ce
        loss_sil = alpha = fresh_ce.new_zeros(())
        if num_replay:
            replay_logits, _ = self.trainable_module(input[:num_replay])
            replay_ce = self._per_sample_loss(replay_logits, target[:num_replay])
            replay = sil_loss(
                replay_logits, replay_ce, target[:num_replay], self.cache.teacher, self.cache.alpha,
                temperature=self.temperature, topk=self.topk, weighting=self.weighting)
            loss = loss + replay['loss']
            loss_sil, alpha = replay['loss_sil'], self.cache.alpha.mean()
            logits, ce = torch.cat([replay_logits, fresh_logits]), torch.cat([replay_ce, fresh_ce])
        if torch.is_grad_enabled():
            self.cache = self._next_cache(input, target, index, logits, [], fresh_start=num_replay, loss_scale=loss_scale)
        return dict(
            loss=loss,
            output=logits,
            target=target,
            loss_ce=ce.mean().detach(),
            loss_sil=loss_sil,
            alpha=alpha,
            sparsity=self.sparsity,
        )
