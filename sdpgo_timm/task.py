"""SDPGOTask: SDPGO self-distillation as a timm TrainingTask.

One step: the model batch is [replay half; fresh half]. One forward of the tapped model
gives logits and the tapped features; the replay half distils from the teacher cached at
the previous step (SIL), weighted by the α that PWA computed for it then; tensor hooks read
the fresh half's feature gradients during the caller's normal backward and PWA turns them
into the α of the fresh half, which is cached with its teacher for the next step.
"""
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from timm.utils import ModelEmaV3, unwrap_model

from .protocol import SelfDistillationTask
from .pwa import ProximalWeightAssignment
from .sil import WEIGHTINGS, per_sample_cross_entropy, sil_loss, teacher_probabilities
from .taps import TappedModel, attach_grad_hooks, resolve_tap_layers, to_bsc

_logger = logging.getLogger(__name__)

ALPHA_MODES = ('pwa', 'fixed')
REPLAY_MODES = ('tensors', 'views')
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def half_batch_size(batch_size: int) -> int:
    """The replay/fresh half of a model batch; the batch must split in two equal halves."""
    if batch_size < 2 or batch_size % 2:
        raise ValueError(
            f"--batch-size must be even and >= 2 for SDPGO (half replay, half fresh), got {batch_size}")
    return batch_size // 2


def _distributed_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes when torch.distributed is initialised, else x."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()
    return x


class ReplayCache:
    """What the fresh half of one step leaves for the next: teacher p, α, and its samples.

    `index` (views mode) identifies the samples the next batch must replay; `input` and
    `target` (tensors mode) are replayed as they are. α is filled in after backward.
    """

    def __init__(self, teacher: torch.Tensor, alpha: Optional[torch.Tensor] = None, **samples: torch.Tensor):
        self.teacher = teacher
        self.alpha = alpha
        self.index: Optional[torch.Tensor] = samples.get('index')
        self.input: Optional[torch.Tensor] = samples.get('input')
        self.target: Optional[torch.Tensor] = samples.get('target')

    def __len__(self) -> int:
        return self.teacher.shape[0]

    def state_dict(self) -> Dict[str, Optional[torch.Tensor]]:
        return dict(teacher=self.teacher, alpha=self.alpha, index=self.index, input=self.input, target=self.target)

    @classmethod
    def from_state_dict(cls, state: Dict[str, Optional[torch.Tensor]], device: torch.device) -> 'ReplayCache':
        moved = {k: (v.to(device) if v is not None else None) for k, v in state.items()}
        samples = {k: moved[k] for k in ('index', 'input', 'target') if moved[k] is not None}
        return cls(moved['teacher'], moved['alpha'], **samples)


class SDPGOTask(SelfDistillationTask):
    """SDPGO self-distillation: Sequential Iterative Learning + Proximal Weight Assignment.

    Args:
        model: a timm model (any with `feature_info` when alpha_mode='pwa').
        temperature: τ of the teacher and student softmax (> 0).
        topk: non-target classes kept in the soft label; < 0 keeps all (DLB).
        beta: EMA rate of PWA's λ and running moments, in [0, 1).
        layers: module names to tap (default: the model's last two feature levels).
        alpha_mode: 'pwa' (per-sample α from gradients) or 'fixed' (constant `alpha`).
        alpha, alpha_min, alpha_max: the fixed α; the clamp of PWA's α.
        alpha_warmup: ramp the replay half's α linearly from 0 over this many training steps
            (steps with a teacher, counted by the task; 0: off), so that the near-uniform teachers of
            the first steps weigh little.
        weighting: 'complementary' ((1−α)CE + ατ²KL) or 'additive' (CE + ατ²KL).
        replay: 'tensors' (caller passes the fresh half; the task replays cached tensors)
            or 'views' (caller passes [replay; fresh] with sample indices).
        smoothing: label smoothing of the built-in per-sample cross-entropy.
        criterion: optional per-sample loss `(logits, target) -> (B,)` replacing it.
        name: the method's name in the set-up log line (default: the class's; a preset's, e.g. DLB's).

    Call `task(input, target, index=None, loss_scale=1.0)`; `loss_scale` is the factor the
    returned loss is multiplied by before backward (AMP scale × 1/accumulation steps),
    needed so that PWA sees gradients on a stable scale; a device tensor (the GradScaler's
    scale) avoids a host sync.
    """

    loss_parts = ('loss_ce', 'loss_sil', 'alpha', 'sparsity')

    def __init__(
            self,
            model: nn.Module,
            *,
            temperature: float = 3.0,
            topk: int = 2,
            beta: float = 0.9,
            layers: Optional[Sequence[str]] = None,
            alpha_mode: str = 'pwa',
            alpha: float = 0.5,
            alpha_min: float = 0.0,
            alpha_max: float = 1.0,
            alpha_warmup: int = 0,
            weighting: str = 'complementary',
            replay: str = 'tensors',
            smoothing: float = 0.0,
            criterion: Optional[PerSampleLoss] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            name: Optional[str] = None,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        num_classes = unwrap_model(model).num_classes
        _check_options(
            temperature=temperature, topk=topk, beta=beta, alpha_mode=alpha_mode, alpha=alpha,
            alpha_min=alpha_min, alpha_max=alpha_max, alpha_warmup=alpha_warmup, weighting=weighting, replay=replay,
            smoothing=smoothing, num_classes=num_classes)
        self.temperature = temperature
        self.topk = topk
        self.alpha_mode = alpha_mode
        self.fixed_alpha = alpha
        self.alpha_warmup = alpha_warmup
        self.teacher_steps = 0  # training steps that had a replay half, for the α warm-up
        self.weighting = weighting
        self.replay = replay
        self.smoothing = smoothing
        self.criterion = criterion

        taps = resolve_tap_layers(model, layers) if alpha_mode == 'pwa' else []
        self.tap_layers = [name for name, _ in taps]
        self._tap_channels = [chs for _, chs in taps]
        self._nhwc = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'
        self._num_prefix_tokens = getattr(model, 'num_prefix_tokens', 0)
        self.trainable_module = TappedModel(model, self.tap_layers)
        self.pwa = ProximalWeightAssignment(
            len(taps), beta=beta, alpha_min=alpha_min, alpha_max=alpha_max, reduce_mean=_distributed_mean)
        self.cache: Optional[ReplayCache] = None
        self.sparsity = torch.zeros(())
        self._weight_log: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None  # (index, α) for sample_weights
        if self.verbose:
            _logger.info(
                f"{name or type(self).__name__}: tau={temperature} topk={topk} alpha_mode={alpha_mode} "
                f"weighting={weighting} replay={replay} taps={self.tap_layers}")

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'SDPGOTask':
        """Wrap the tapped model (one module, one forward) in DistributedDataParallel."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the timm model regionally so that the taps sit between compiled regions.

        A tap inside one compiled graph would record a side output that no gradient
        reaches; so every module that is neither tapped nor holds a tap is compiled on
        its own, and tapped modules (and their ancestors) stay eager around compiled children.
        """
        model = unwrap_model(self.trainable_module).model
        compile_regions(model, self.tap_layers, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = model
        return model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        resolved = super().get_eval_model(module=module, ema=ema)
        current = resolved
        while current is not None:
            if isinstance(current, TappedModel):
                return current.model
            current = getattr(current, 'module', None)
        return resolved

    def setup_ema(self, decay: float = 0.9999, use_warmup: bool = False, device=None, **kwargs) -> nn.Module:
        """EMA of the plain timm model (not the tapped wrapper): it evaluates and saves as timm's."""
        self.trainable_module_ema = ModelEmaV3(
            self.get_eval_model(), decay=decay, use_warmup=use_warmup, device=device, **kwargs)
        return self.trainable_module_ema

    def update_ema(self, step: Optional[int] = None) -> None:
        if self.has_ema():
            self.trainable_module_ema.update(self.get_eval_model(), step=step)

    def log_sample_weights(self) -> bool:
        """Keep each fresh sample's α with its dataset index (batches that carry indices: views replay, indexed
        data); PWA's α only, a fixed α says nothing per sample."""
        if self.alpha_mode != 'pwa':
            return False
        self._weight_log = []
        return True

    def sample_weights(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(indices, α) of the fresh halves whose α PWA computed since the previous call (the α that weighs
        each sample's replay at the next step, before any warm-up ramp)."""
        if self._weight_log is None:
            return None
        done, self._weight_log = self._weight_log, []
        if not done:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        return torch.cat([i for i, _ in done]).cpu(), torch.cat([a for _, a in done]).float().cpu()

    def replay_rows(self, num_replay: int) -> int:
        """All replayed rows when a teacher is cached for them; none without one (the first step, a resume from
        weights only): the step then trains on its fresh half alone (see `_teacherless_replay`)."""
        return num_replay if self.cache is not None else 0

    def training_state(self) -> Dict[str, Any]:
        """PWA state and the replay cache of this process."""
        return dict(
            pwa=self.pwa.state_dict(),
            cache=self.cache.state_dict() if self.cache is not None else None,
            replay=self.replay,
            sparsity=self.sparsity,
            teacher_steps=self.teacher_steps,
        )

    def load_training_state(self, state: Dict[str, Any]) -> None:
        """Restore PWA and the replay cache; a state of the other replay mode is refused."""
        if state.get('replay') != self.replay:
            raise ValueError(
                f"checkpoint replay mode {state.get('replay')!r} differs from --sdpgo-replay {self.replay!r}")
        self.pwa.load_state_dict(state['pwa'])
        self.sparsity = state.get('sparsity', self.sparsity)
        self.teacher_steps = state.get('teacher_steps', 0)
        cache = state.get('cache')
        self.cache = ReplayCache.from_state_dict(cache, self.device) if cache is not None else None

    def _per_sample_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.criterion is None:
            return per_sample_cross_entropy(logits, target, self.smoothing)
        loss = self.criterion(logits, target).float()
        if loss.ndim != 1:
            raise ValueError("SDPGOTask criterion must return one loss per sample (reduction='none')")
        return loss

    def _batch(self, input, target, index):
        """Full model batch [replay; fresh] and the number of replayed samples."""
        cache = self.cache
        if self.replay == 'tensors':
            if cache is None:
                return input, target, 0
            replay_target = _match_target_format(cache.target, target)
            target = _match_target_format(target, cache.target)
            return torch.cat([cache.input, input]), torch.cat([replay_target, target]), len(cache)
        if index is None:
            raise ValueError("replay='views' needs the sample indices: task(input, target, index=index)")
        num_replay = 0 if cache is None else len(cache)
        if num_replay and not torch.equal(index[:num_replay].to(cache.index.device), cache.index):
            raise RuntimeError(
                "SDPGO views replay mismatch: the first half of this batch is not the fresh half of the "
                "previous step, so its cached teacher would be wrong. Use the ReplayBatchSampler (or a new task "
                "after changing the data order).")
        if num_replay and len(input) <= num_replay:
            raise RuntimeError("SDPGO views batch has no fresh half after its replay half")
        return input, target, num_replay

    def forward(
            self,
            input: torch.Tensor,
            target: torch.Tensor,
            index: Optional[torch.Tensor] = None,
            loss_scale: Union[float, torch.Tensor] = 1.0,
    ) -> Dict[str, torch.Tensor]:
        """One SDPGO step's loss; see the class docstring for the arguments.

        Returns loss, output (logits of the model batch), target (its targets, replay
        half included), loss_ce, loss_sil, alpha (mean α of the replay half, 0 without one)
        and sparsity (share of zero channel weights at the latest PWA update).
        """
        input, target, num_replay = self._batch(input, target, index)
        fresh_start = num_replay
        if not num_replay and torch.is_grad_enabled():
            input, target, index = _teacherless_replay(input, target, index)
            fresh_start = len(input) // 2
        logits, features = self.trainable_module(input)
        cache = self.cache
        teacher = cache.teacher if num_replay else None
        alpha = cache.alpha if num_replay else None
        if num_replay and alpha is None:
            _logger.warning("SDPGO: no backward ran on the previous step; its replay half uses alpha=0.5")
            alpha = teacher.new_full((num_replay,), 0.5)
        if num_replay and torch.is_grad_enabled():
            self.teacher_steps += 1
            if self.alpha_warmup and self.teacher_steps < self.alpha_warmup:
                alpha = alpha * (self.teacher_steps / self.alpha_warmup)

        out = sil_loss(
            logits, self._per_sample_loss(logits, target), target, teacher, alpha,
            temperature=self.temperature, topk=self.topk, weighting=self.weighting)

        if torch.is_grad_enabled():
            self.cache = self._next_cache(input, target, index, logits, features, fresh_start, loss_scale)
        out.update(
            output=logits,
            target=target,
            alpha=alpha.mean() if alpha is not None else logits.new_zeros((), dtype=torch.float32),
            sparsity=self.sparsity,
        )
        return out

    def _next_cache(self, input, target, index, logits, features, fresh_start, loss_scale) -> ReplayCache:
        fresh = slice(fresh_start, None)
        # tensors replay: `index` (when the loader gives one) covers the rows the caller passed, the fresh ones
        samples = dict(index=index[len(index) - (len(input) - fresh_start):].detach()) if index is not None else {}
        if self.replay == 'tensors':
            samples.update(input=input[fresh].detach(), target=target[fresh].detach())
        cache = ReplayCache(teacher_probabilities(logits[fresh], self.temperature), **samples)
        if self.alpha_mode == 'fixed':
            cache.alpha = logits.new_full((len(cache),), self.fixed_alpha, dtype=torch.float32)
        else:
            self._attach_pwa(cache, features, fresh_start, grad_multiplier=len(input) / loss_scale)
        return cache

    def _attach_pwa(
            self,
            cache: ReplayCache,
            features: List[torch.Tensor],
            fresh_start: int,
            grad_multiplier: Union[float, torch.Tensor],
    ):
        """Hook the fresh half of each tapped feature; fill cache.alpha once all have fired."""
        z: List[Optional[torch.Tensor]] = [None] * len(features)
        sparsity: List[Optional[torch.Tensor]] = [None] * len(features)

        def on_grad(i: int, feature: torch.Tensor, grad: torch.Tensor) -> None:
            chs, prefix = self._tap_channels[i], self._num_prefix_tokens
            f = to_bsc(feature.detach()[fresh_start:], chs, prefix, self._nhwc)
            g = to_bsc(grad[fresh_start:], chs, prefix, self._nhwc) * grad_multiplier
            scores = self.pwa.layer_scores(i, f, g)
            z[i], sparsity[i] = scores['z'], scores['sparsity']
            if all(s is not None for s in z):
                cache.alpha = self.pwa.advance(z)
                self.sparsity = torch.stack(sparsity).mean().detach()
                if self._weight_log is not None and cache.index is not None:
                    self._weight_log.append((cache.index, cache.alpha.detach()))

        attach_grad_hooks(features, on_grad)


def compile_regions(module: nn.Module, keep_eager: Sequence[str], prefix: str = '', **compile_kwargs) -> None:
    """torch.compile each child of `module` that neither is nor contains a `keep_eager` module."""
    for name, child in module.named_children():
        full = prefix + name
        if any(k == full or k.startswith(full + '.') for k in keep_eager):
            compile_regions(child, keep_eager, full + '.', **compile_kwargs)
        else:
            child.compile(**compile_kwargs)


def _teacherless_replay(input: torch.Tensor, target: torch.Tensor, index: Optional[torch.Tensor]):
    """[fresh; fresh]: a step with no teacher yet (the first, or after a weights-only resume) gets
    only a fresh half; its copy stands in for the replay half with plain CE (the same mean loss and
    gradient), so that every step has the same batch shape (no torch.compile recompile, one set of
    allocator buffers) and PWA reads the second copy as it reads any fresh half."""
    return (torch.cat([input, input]), torch.cat([target, target]),
            None if index is None else torch.cat([index, index]))


def _match_target_format(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Class indices as one-hot rows when the other half carries soft targets."""
    if target.ndim == 1 and like.ndim == 2:
        return F.one_hot(target.long(), like.shape[1]).to(like.dtype)
    return target


def _check_options(
        *, temperature, topk, beta, alpha_mode, alpha, alpha_min, alpha_max, alpha_warmup, weighting, replay,
        smoothing, num_classes,
) -> None:
    """One ValueError per bad option, naming it and the accepted values."""
    if not temperature > 0:
        raise ValueError(f"sdpgo temperature must be > 0, got {temperature}")
    if topk >= num_classes:
        raise ValueError(
            f"sdpgo topk must be < num_classes ({num_classes}), or < 0 for the full distribution; got {topk}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"sdpgo beta must be in [0, 1), got {beta}")
    if alpha_mode not in ALPHA_MODES:
        raise ValueError(f"sdpgo alpha_mode must be one of {ALPHA_MODES}, got {alpha_mode!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"sdpgo weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if replay not in REPLAY_MODES:
        raise ValueError(f"sdpgo replay must be one of {REPLAY_MODES}, got {replay!r}")
    if not 0.0 <= alpha_min <= alpha_max <= 1.0:
        raise ValueError(f"sdpgo alpha_min/alpha_max must satisfy 0 <= min <= max <= 1, got {alpha_min}, {alpha_max}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sdpgo alpha must be in [0, 1], got {alpha}")
    if alpha_warmup < 0:
        raise ValueError(f"sdpgo alpha_warmup must be >= 0 steps, got {alpha_warmup}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
