"""bfloat16 training on the CPU: train.py refuses the convolutions whose bfloat16 weight gradient oneDNN gets wrong.

On CPUs where oneDNN runs its AVX-512 or AMX kernels (torch 2.14, oneDNN 3.12), the bfloat16 weight gradient of a
convolution that pads its input and strides wider than that input (test_resnet's layer4 at 16 px: a 3x3, stride-2
convolution over 1 pixel) is computed from memory the kernel never wrote: NaN, or finite and wrong, depending on
what ran before in the process (so `--model-dtype bfloat16` failed only after another test). Float32 and float16
are right, and so are the same shapes on AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2).
"""
import argparse
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdpgo_timm.runner.errors import ConfigError
from sdpgo_timm.runner.setup import check_cpu_bfloat16_convolutions

CPU = torch.device('cpu')
# (input height, input width, kernel, stride, padding): small maps, square kernels and strides
GEOMETRIES = [(h, w, k, s, p) for h, w, k, s in itertools.product((1, 4), (1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3, 5))
              for p in range(k // 2 + 1) if w + 2 * p >= k and h + 2 * p >= k]


def _poison_freed_memory() -> None:
    """Free NaN-filled blocks of many sizes, so that a kernel reading memory it never wrote reads NaN."""
    blocks = [torch.full((1 << n,), float('nan'), dtype=dtype) for n in range(8, 22)
              for dtype in (torch.float32, torch.bfloat16)]
    del blocks


def _weight_gradient_is_wrong(h: int, w: int, k: int, s: int, p: int) -> bool:
    torch.manual_seed(0)
    x = torch.randn(4, 16, h, w).bfloat16()
    weight = (torch.randn(16, 16, k, k) * 0.05).bfloat16()
    exact = weight.double().requires_grad_()
    out = F.conv2d(x.double(), exact, stride=s, padding=p)
    grad_out = (torch.randn_like(out) * 1e-3).bfloat16()
    out.backward(grad_out.double())
    for _ in range(2):
        _poison_freed_memory()
        ours = weight.clone().requires_grad_()
        F.conv2d(x, ours, stride=s, padding=p).backward(grad_out)
        error = (ours.grad.double() - exact.grad).abs().max()
        # bfloat16 rounding of 16 products or fewer is well under 5% of the largest gradient; memory never written
        # is NaN here, or off by orders of magnitude
        if not error <= 0.05 * exact.grad.abs().max() + 1e-6:
            return True
    return False


def _refused(h: int, w: int, k: int, s: int, p: int) -> bool:
    args = argparse.Namespace(model_dtype='bfloat16', amp=False, amp_dtype='float16', train_img_sizes=None)
    try:
        check_cpu_bfloat16_convolutions(args, nn.Sequential(nn.Conv2d(16, 16, k, stride=s, padding=p)).bfloat16(),
                                        CPU, (16, h, w))
    except ConfigError:
        return True
    return False


def test_every_convolution_whose_bfloat16_weight_gradient_is_wrong_on_this_cpu_is_refused():
    """On this CPU's kernels (AVX2 ones get every shape right: then nothing is wrong, and the refusals stand, so
    that a command trains the same everywhere)."""
    wrong = {g for g in GEOMETRIES if _weight_gradient_is_wrong(*g)}
    refused = {g for g in GEOMETRIES if _refused(*g)}
    assert wrong <= refused, f'wrong but not refused: {sorted(wrong - refused)}'
    # refused: a padded convolution whose stride exceeds its input's width, no other
    assert refused == {(h, w, k, s, p) for h, w, k, s, p in GEOMETRIES if p > 0 and s > w}


def test_the_check_leaves_the_model_and_the_random_state_as_they_were():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)).bfloat16()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    args = argparse.Namespace(model_dtype='bfloat16', amp=False, amp_dtype='float16', train_img_sizes=None)
    check_cpu_bfloat16_convolutions(args, model, CPU, (3, 32, 32))
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
