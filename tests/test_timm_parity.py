"""Plain runs (no --sdpgo) of our train.py reproduce timm's own train.py: same command line, same seed.

tests/data/timm_parity.json holds what timm's train.py (the commit is named in the file) reported for each
case of benchmarks/timm_parity.py: the summary.csv rows (epoch, train_loss, eval_loss, eval_top1, eval_top5,
lr), the numbers of every `Train:` progress line and the loss of every backward pass. It was recorded on the
CPU with one thread and `--workers 0` by `python benchmarks/timm_parity.py --timm-scripts <checkout> --write
tests/data/timm_parity.json`; the same script without --write runs both scripts side by side on one machine,
where they must agree exactly. Here our train.py runs each case in this process on one thread, on whatever CPU
runs the suite, so what the test compares is what does not depend on that CPU's kernels:

- exactly: the number of backward passes and epochs, each epoch's learning rate, and each progress line's epoch,
  update index and learning rate (Python arithmetic of the schedule);
- within a margin argued from the kernels: the loss of each of the first EARLY_STEPS backward passes, epoch 0's
  summary losses, and the progress lines among those steps. These come from the same initial weights and the
  same draws, through at most one epoch at the warm-up learning rate, so kernels that sum in another order
  (oneDNN's AVX2, AVX-512 and AMX convolutions, ATen's vectorised reductions) move them by rounding only.
  In float32 that is a few units of 2**-24 per reduction: FP32_REL = 1e-5 holds ~170 of them (measured under
  six ISA settings, ATEN_CPU_CAPABILITY default/avx2/avx512 x ONEDNN_MAX_CPU_ISA SSE41 to AVX512_CORE_AMX: at
  most 3e-7). Under bfloat16 autocast the loss is itself a bfloat16 number (8 significant bits), and another
  kernel's rounding of a convolution or matmul output moves it by at most one bfloat16 step (measured: equal,
  or one step apart). epoch 0's top-1/top-5 may differ by one image, a near-tie flipped by that rounding.

Later steps are not compared: after the first updates at the full learning rate, those rounding differences grow
step by step (measured: 1e-6 by the 9th backward pass, 1e-3 to 1e-2 by the 18th), so their agreement with timm is
only checked side by side on one machine. A real difference from timm (another draw, augmentation, loss, step
order or schedule) moves the first losses by more than the margins. Checked by injecting two: the EMA updated one
step behind (the bug this test once caught) moves epoch 0's eval loss in mixup_accum_ema by 4.4e-5 relative (4x
FP32_REL, 3000x the spread measured across kernels); drop path left out moves augment_adamw_bf16's 4th loss by
three bfloat16 steps (1.227 against 1.203).
"""
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_train

_spec = importlib.util.spec_from_file_location('timm_parity', ROOT / 'benchmarks' / 'timm_parity.py')
timm_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timm_parity)
REFERENCE = json.loads((Path(__file__).parent / 'data' / 'timm_parity.json').read_text())

EARLY_STEPS = 7  # epoch 0 (6 steps of 16 images) and the first step of epoch 1
FP32_REL = 1e-5
# one step of bfloat16 (8 significant bits) is at most 2**-7 of the larger of two neighbours; the mean of losses
# that differ by a step each differs by at most 2**-7 of the larger mean
BF16_REL = 2.0 ** -7


def _within_kernel_rounding(ours: float, theirs: float, bfloat16: bool) -> bool:
    return abs(ours - theirs) <= (BF16_REL if bfloat16 else FP32_REL) * max(abs(ours), abs(theirs))


@pytest.fixture(scope='module')
def parity_folder(tmp_path_factory) -> Path:
    return timm_parity.write_image_folder(tmp_path_factory.mktemp('parity'))


@pytest.mark.parametrize('case', list(REFERENCE['cases']))
def test_plain_run_gives_timms_losses_accuracy_and_progress_lines(case, parity_folder, tmp_path, caplog, monkeypatch):
    reference = REFERENCE['cases'][case]
    assert REFERENCE['common'] == timm_parity.COMMON and reference['argv'] == timm_parity.CASES[case]
    bfloat16 = 'bfloat16' in reference['argv']
    losses = []
    backward = torch.Tensor.backward

    def recorded(loss, *args, **kwargs):  # as benchmarks/timm_parity.py records timm's
        if loss.dim() == 0:
            losses.append(loss.item())
        return backward(loss, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, 'backward', recorded)
    caplog.set_level(logging.INFO)
    assert run_train([str(parity_folder), *REFERENCE['common'], *reference['argv'], '--output', str(tmp_path),
                      '--experiment', 'ours']) == 0
    monkeypatch.undo()

    assert len(losses) == len(reference['losses'])
    for step, (ours, theirs) in enumerate(zip(losses[:EARLY_STEPS], reference['losses'])):
        assert _within_kernel_rounding(ours, theirs, bfloat16), f"backward pass {step}: {ours!r} vs timm's {theirs!r}"

    summary = timm_parity.read_summary(tmp_path / 'ours' / 'summary.csv')
    assert [(row.keys(), row['epoch'], row['lr']) for row in summary] == [
        (row.keys(), row['epoch'], row['lr']) for row in reference['summary']]
    ours, theirs = summary[0], reference['summary'][0]
    for key in ('train_loss', 'eval_loss'):
        if key in theirs:
            assert _within_kernel_rounding(ours[key], theirs[key], bfloat16), f"epoch 0 {key}: {ours} vs {theirs}"
    one_image = 100 / (3 * 12)  # of the 36 validation images
    for key in ('eval_top1', 'eval_top5'):
        if key in theirs:
            assert ours[key] == pytest.approx(theirs[key], abs=one_image + 1e-9), f'epoch 0 {key}'

    progress = timm_parity.parse_progress([r.getMessage() for r in caplog.records])
    # epoch, update index, lr: exact
    assert [line[:2] + line[4:] for line in progress] == [line[:2] + line[4:] for line in reference['progress']]
    printed = 1e-2 + (BF16_REL if bfloat16 else FP32_REL)  # 3 significant digits: a last digit rounded the other way
    for ours, theirs in zip(progress, reference['progress']):
        if ours[0] == 0:  # epoch 0's lines: the losses as printed
            assert ours[2:4] == pytest.approx(theirs[2:4], rel=printed), f'progress line {theirs}'
