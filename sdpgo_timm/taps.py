"""Feature taps: record tensors on the path to the logits and read their gradients.

PWA needs ∂L/∂F of intermediate features during the one normal backward. Forward hooks
on the `feature_info` modules keep the very tensors the next layer consumes (timm's
`forward_intermediates` returns side copies for ViT/Swin that no gradient reaches), and a
tensor hook on each hands back its gradient. Features are brought to (batch, positions,
channels) whatever the layout: NCHW, NHWC, or NLC with prefix tokens (cls/dist/register).
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


def feature_modules(model: nn.Module) -> List[dict]:
    """The model's feature_info entries (module name, num_chs, reduction)."""
    info = getattr(model, 'feature_info', None)
    if not info:
        raise ValueError(
            f"{type(model).__name__} has no feature_info; pass --sdpgo-layers with module names "
            "to tap, or use alpha_mode='fixed' (no taps).")
    return [dict(i) for i in info]


def default_tap_layers(model: nn.Module) -> List[str]:
    """The last two feature levels, skipping dead-end token maps.

    In a token-pooled ViT/DeiT (global_pool='token') only the prefix token of the last
    block reaches the head, so its patch tokens get zero gradient and carry no signal:
    the two blocks before it are used instead.
    """
    names = [f['module'] for f in feature_modules(model)]
    if getattr(model, 'global_pool', None) == 'token' and getattr(model, 'num_prefix_tokens', 0) > 0:
        names = names[:-1]
    return names[-2:]


def resolve_tap_layers(model: nn.Module, layers: Optional[Sequence[str]]) -> List[Tuple[str, int]]:
    """(module name, channels) of each tap; unknown names raise a ValueError listing the valid ones."""
    info = {f['module']: f['num_chs'] for f in feature_modules(model)}
    names = list(layers) if layers else default_tap_layers(model)
    modules = dict(model.named_modules())
    taps = []
    for name in names:
        if name not in modules:
            raise ValueError(
                f"sdpgo layers: unknown layer {name!r} for {type(model).__name__}; "
                f"feature levels are {list(info)}")
        taps.append((name, info.get(name, 0)))
    return taps


def to_bsc(x: torch.Tensor, num_chs: int, num_prefix_tokens: int = 0, nhwc: bool = False) -> torch.Tensor:
    """View a feature tensor as (batch, positions, channels).

    4-d tensors are NCHW unless `nhwc` (e.g. Swin) or only the last dim matches the
    channel count; 3-d tensors are NLC and lose their `num_prefix_tokens` leading tokens.
    """
    if x.ndim == 4:
        if nhwc or (num_chs and x.shape[-1] == num_chs and x.shape[1] != num_chs):
            return x.flatten(1, 2)
        return x.flatten(2).transpose(1, 2)
    if x.ndim == 3:
        return x[:, num_prefix_tokens:]
    raise ValueError(f"cannot tap a feature of shape {tuple(x.shape)}: expected NCHW, NHWC or NLC")


class FeatureTaps:
    """Forward hooks that collect the outputs of named modules during one forward.

    Recording is switched on only inside `record()`, so recomputation under gradient
    checkpointing (which re-runs module forwards during backward) does not add entries.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = list(names)
        self._outputs: List[Optional[torch.Tensor]] = [None] * len(self.names)
        self._recording = False
        modules = dict(model.named_modules())
        for i, name in enumerate(self.names):
            modules[name].register_forward_hook(self._make_hook(i))

    def _make_hook(self, index: int) -> Callable:
        def hook(module, args, output):
            if self._recording:
                self._outputs[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def start(self) -> None:
        self._outputs = [None] * len(self.names)
        self._recording = True

    def stop(self, check: bool = True) -> List[torch.Tensor]:
        """The tapped outputs of the forward since `start()`; with `check`, a RuntimeError if one did not run."""
        self._recording = False
        outputs, self._outputs = self._outputs, [None] * len(self.names)
        missing = [n for n, o in zip(self.names, outputs) if o is None]
        if missing and check:
            raise RuntimeError(f"tapped layers {missing} did not run in the forward pass")
        return outputs


class TappedModel(nn.Module):
    """Trainable module: the timm model plus its taps; forward returns (logits, features).

    Everything that needs gradients happens in this one forward so that DDP and
    torch.compile wrap a single module; its `model` is the plain timm model that is
    evaluated and saved.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.model = model
        self.taps = FeatureTaps(model, layers) if layers else None

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if self.taps is None:
            return self.model(input), []
        self.taps.start()
        try:
            logits = self.model(input)
        except BaseException:  # a second Ctrl-C or an error mid-forward: stop recording and raise that, not the
            self.taps.stop(check=False)  # taps that did not run
            raise
        return logits, self.taps.stop()


def attach_grad_hooks(
        features: Sequence[torch.Tensor],
        callback: Callable[[int, torch.Tensor, torch.Tensor], None],
) -> None:
    """Call `callback(index, feature, grad)` when the gradient of each feature arrives."""
    for i, feature in enumerate(features):
        if feature.requires_grad:
            # the hook holds a detached view: holding `feature` itself would make a reference cycle through
            # autograd's C++ hook list that Python cannot collect, leaking every step's graph
            feature.register_hook(lambda grad, i=i, feature=feature.detach(): callback(i, feature, grad))


def layers_without_gradient(model: nn.Module, names: Sequence[str], input_size: Tuple[int, ...]) -> List[str]:
    """The tapped modules of `names` whose output no gradient would reach: no trainable parameter at or before
    them (frozen layers, e.g. by timm's --layer-decay-no-opt-scale), so their gradient hooks would never fire.

    Found by one forward of a zero batch of `input_size` in eval mode with the RNGs untouched; when every
    parameter trains, none is run (nothing can be cut off).
    """
    if not names or all(p.requires_grad for p in model.parameters()):
        return []
    reached = {}

    def record(name: str, output) -> None:
        output = output[0] if isinstance(output, (tuple, list)) else output
        reached[name] = output.requires_grad

    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: record(n, o)) for n in names]
    first = next(model.parameters())
    training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            model.eval()
            model(torch.zeros(1, *input_size, device=first.device, dtype=first.dtype))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return [n for n in names if not reached.get(n, False)]
