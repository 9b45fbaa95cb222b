"""The method registry (sdpgo_timm.methods): each method declared once, the runner naming none, and a new
method added through the registry alone, trained by train.py."""
import argparse
import ast

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import ClassificationTask
from torch.utils.data import IterableDataset

from sdpgo_timm.methods import METHODS, Method, get_method, register_method
from sdpgo_timm.protocol import SelfDistillationTask
from sdpgo_timm.runner.args import parse_args
from sdpgo_timm.runner.checkpoint import load_checkpoint_file
from conftest import FAST, ROOT, run_train, summary


class ConstantTargetTask(SelfDistillationTask, ClassificationTask):
    """CE plus `weight` * KL(uniform || softmax(z)): a toy self-distillation method with a constant teacher."""
    loss_parts = ('loss_ce', 'loss_kl')
    state_shared_across_ranks = True

    def __init__(self, model: nn.Module, weight: float, device=None):
        super().__init__(model, criterion=nn.CrossEntropyLoss(), device=device, verbose=False)
        self.weight = weight

    def forward(self, input, target, index=None, loss_scale=1.0):
        logits = self.trainable_module(input)
        ce = F.cross_entropy(logits, target)
        uniform = torch.full_like(logits, 1 / logits.shape[-1])
        kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), uniform, reduction='batchmean')
        return dict(loss=ce + self.weight * kl, output=logits, target=target, loss_ce=ce.detach(),
                    loss_kl=kl.detach())


def _add_toy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group('Toy parameters').add_argument('--toy-weight', type=float, default=0.0)


def _check_toy_args(args: argparse.Namespace) -> None:
    if args.toy_weight < 0:
        raise ValueError(f"--toy-weight must be >= 0, got {args.toy_weight}")


TOY = Method('toy', flag='--skd toy', summary='CE plus a constant-target KL',
             build_task=lambda args, model, feed, device, num_samples: ConstantTargetTask(model, args.toy_weight,
                                                                                          device=device),
             add_args=_add_toy_args, check_args=_check_toy_args)


@pytest.fixture
def toy():
    register_method(TOY)
    yield TOY
    del METHODS[TOY.name]


def test_a_method_added_through_the_registry_trains_with_train_py(toy, tmp_path):
    out = tmp_path / 'out'
    assert run_train(['digits', '--skd', 'toy', '--toy-weight', '0.5', '--epochs', '1', *FAST,
                      '--train-batches-per-epoch', '3', '--output', str(out), '--experiment', 'toy']) == 0
    row, = summary(out / 'toy')
    # the task's own loss parts are logged, and its flag reached it: loss = CE + 0.5 KL (means over the same rows)
    loss, ce, kl = (float(row[k]) for k in ('train_loss', 'train_loss_ce', 'train_loss_kl'))
    assert kl > 0 and loss == pytest.approx(ce + 0.5 * kl, rel=1e-5)
    checkpoint = load_checkpoint_file(str(out / 'toy' / 'last.pth.tar'))
    assert checkpoint['args'].method == 'toy' and checkpoint['args'].skd == 'toy'


def test_a_methods_own_check_refuses_its_flags_at_parse_time(toy, error_lines):
    assert run_train(['digits', '--skd', 'toy', '--toy-weight', '-1', *FAST]) == 2
    assert error_lines()[-1] == 'error: --toy-weight must be >= 0, got -1.0'


@pytest.mark.parametrize('argv, name', [
    ([], 'ce'), (['--sdpgo'], 'sdpgo'), (['--skd', 'sdpgo'], 'sdpgo'), (['--skd', 'dlb2'], 'dlb2'),
    (['--skd', 'pskd'], 'pskd'), (['--kd-model-name', 'test_resnet'], 'kd')])
def test_the_flags_resolve_to_one_method_at_parse_time(argv, name):
    args, text = parse_args(['digits', *argv])
    assert args.method == name
    assert 'method:' not in text  # args.yaml holds the flags (a config file must read it back)


class _Stream(IterableDataset):
    def __iter__(self):
        return iter([])


@pytest.mark.parametrize('name, replay, dataset, feed', [
    ('sdpgo', 'auto', [0], 'views'), ('sdpgo', 'auto', _Stream(), 'tensors'), ('dlb', 'tensors', [0], 'tensors'),
    ('dlb2', 'auto', [0], 'views'), ('pskd', 'auto', [0], 'indexed'), ('ce', 'views', [0], None),
    ('kd', 'auto', _Stream(), None)])
def test_each_method_declares_its_feed(name, replay, dataset, feed):
    assert get_method(name).resolve_feed(argparse.Namespace(sdpgo_replay=replay), dataset) == feed


@pytest.mark.parametrize('name, replay, message', [
    ('dlb2', 'tensors', '--skd dlb2 replays views only: use --sdpgo-replay views'),
    ('dlb2', 'auto', '--sdpgo-replay views needs an indexable dataset, but this one streams; --skd dlb2 needs'),
    ('pskd', 'auto', '--skd pskd looks its samples up by index and needs an indexable dataset')])
def test_a_feed_the_method_cannot_take_is_refused(name, replay, message):
    dataset = [0] if replay == 'tensors' else _Stream()
    with pytest.raises(ValueError, match=message):
        get_method(name).resolve_feed(argparse.Namespace(sdpgo_replay=replay), dataset)


def test_no_runner_module_names_a_method():
    """The runner reads method declarations; no string of it is a method's name (or its --skd spelling)."""
    names = {m.name for m in METHODS.values()} | {f'--skd {m.name}' for m in METHODS.values()}
    for path in sorted((ROOT / 'sdpgo_timm' / 'runner').glob('*.py')):
        strings = {node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & names, f"{path.name} names {sorted(strings & names)}"
