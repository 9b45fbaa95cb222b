"""PSKDTask: last-epoch soft targets, α schedule, table updates and state, DDP table sync, indexed loader."""
import argparse
import copy
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from sdpgo_timm.skd import create_skd_task
from sdpgo_timm.data import DigitsDataset
from sdpgo_timm.skd.pskd import PSKDTask, _last_write_wins
from sdpgo_timm.data.replay import create_indexed_loader
from sdpgo_timm.runner.checkpoint import gather_rank_states
from sdpgo_timm.sil import per_sample_kl

NUM_CLASSES = 5


def _tiny():
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=NUM_CLASSES)
    return model.eval()  # no BatchNorm batch coupling: a row's logits do not depend on its batch


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _soft_ce(logits, soft_target):
    return -(soft_target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def test_first_epoch_is_plain_ce_and_fills_the_table():
    model = _tiny()
    task = PSKDTask(model, 10, epochs=4, verbose=False)
    x, y = _batch(0)
    index = torch.tensor([7, 2, 5, 0])
    out = task(x, y, index)
    logits = model(x)
    torch.testing.assert_close(out['loss'], F.cross_entropy(logits, y))
    assert out['alpha'].item() == 0.0 and out['loss_sil'].item() == 0.0
    torch.testing.assert_close(task.table[index], F.softmax(logits, dim=1))
    assert task.seen.tolist() == [i in (0, 2, 5, 7) for i in range(10)]
    assert (task.table[~task.seen] == 0).all() and task.table.dtype == torch.float32


def test_soft_target_mixes_last_prediction_for_seen_samples_only():
    model = _tiny()
    task = PSKDTask(model, 8, epochs=4, alpha_t=0.8, verbose=False)
    x0, y0 = _batch(0)
    task(x0, y0, torch.tensor([0, 1, 2, 3]))['loss'].backward()
    prev = F.softmax(model(x0), dim=1)[2:]  # samples 2, 3; no optimizer step, so the table holds these
    task.set_epoch(2)
    x1, y1 = _batch(1)
    out = task(x1, y1, torch.tensor([2, 3, 4, 5]))  # 2, 3 seen; 4, 5 never seen: target alone
    logits = model(x1)
    y = F.one_hot(y1, NUM_CLASSES).float()
    alpha = 0.8 * 2 / 4
    soft = torch.cat([(1 - alpha) * y[:2] + alpha * prev, y[2:]])
    torch.testing.assert_close(out['loss'], _soft_ce(logits, soft))
    torch.testing.assert_close(out['loss_ce'], F.cross_entropy(logits, y1))
    torch.testing.assert_close(out['loss_sil'], per_sample_kl(prev, logits[:2], 1.0).mean())
    assert out['alpha'].item() == pytest.approx(alpha)


def test_smoothing_applies_to_class_indices_and_soft_targets_pass_through():
    model = _tiny()
    x, y = _batch(0)
    out = PSKDTask(model, 4, epochs=1, smoothing=0.1, verbose=False)(x, y, torch.arange(4))
    torch.testing.assert_close(out['loss'], F.cross_entropy(model(x), y, label_smoothing=0.1))
    mixed = 0.7 * F.one_hot(y, NUM_CLASSES) + 0.3 * F.one_hot(y.flip(0), NUM_CLASSES)
    out = PSKDTask(model, 4, epochs=1, smoothing=0.1, verbose=False)(x, mixed, torch.arange(4))
    torch.testing.assert_close(out['loss'], _soft_ce(model(x), mixed.float()))


def test_repeated_index_keeps_its_last_row():
    model = _tiny()
    task = PSKDTask(model, 4, epochs=1, verbose=False)
    x, y = _batch(0)
    task(x, y, torch.tensor([1, 3, 1, 0]))
    torch.testing.assert_close(task.table[1], F.softmax(model(x[2:3]), dim=1)[0])
    # every write to a repeated index carries that last row, so the order of writes (CUDA) cannot matter
    rows = torch.arange(4.0).unsqueeze(1)
    index, written = _last_write_wins(torch.tensor([1, 3, 1, 0]), rows)
    assert index.tolist() == [0, 1, 1, 3] and written.squeeze(1).tolist() == [3.0, 2.0, 2.0, 1.0]


def test_no_update_without_grad():
    task = PSKDTask(_tiny(), 4, epochs=1, verbose=False)
    with torch.no_grad():
        task(*_batch(0), torch.arange(4))
    assert not task.seen.any() and (task.table == 0).all()


def test_alpha_schedule_follows_set_epoch_and_stops_at_alpha_t():
    task = PSKDTask(_tiny(), 4, epochs=10, alpha_t=0.5, verbose=False)
    for epoch, expected in ((0, 0.0), (4, 0.2), (10, 0.5), (12, 0.5)):
        task.set_epoch(epoch)
        assert task.alpha == pytest.approx(expected)


def test_state_round_trip_gives_same_next_loss():
    model = _tiny()
    task = PSKDTask(model, 8, epochs=3, verbose=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed, index in ((0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])):
        task(*_batch(seed), torch.tensor(index))['loss'].backward()
        opt.step()
        opt.zero_grad()
    task.set_epoch(1)
    state = copy.deepcopy(task.get_task_state())
    restored = PSKDTask(copy.deepcopy(model), 8, epochs=3, table_device=None, verbose=False)
    restored.load_task_state(state)
    assert restored.epoch == 1 and restored.table.device == restored.device
    x, y = _batch(2)
    index = torch.tensor([6, 1, 3, 4])
    torch.testing.assert_close(restored(x, y, index)['loss'], task(x, y, index)['loss'], rtol=0, atol=0)
    with pytest.raises(ValueError, match='PS-KD table'):
        PSKDTask(_tiny(), 9, epochs=3, verbose=False).load_task_state(state)


def test_needs_indices():
    with pytest.raises(ValueError, match='index'):
        PSKDTask(_tiny(), 4, epochs=1, verbose=False)(*_batch(0))


@pytest.mark.parametrize('kwargs,match', [
    (dict(alpha_t=1.5), 'alpha_t'),
    (dict(epochs=0), 'epochs'),
    (dict(smoothing=1.0), 'smoothing'),
    (dict(num_samples=0), 'num_samples'),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSKDTask(_tiny(), **{'num_samples': 4, 'epochs': 1, **kwargs}, verbose=False)


def test_registry_and_eval_model():
    model = _tiny()
    task = create_skd_task(model, 'pskd', num_samples=6, epochs=2, verbose=False)
    assert isinstance(task, PSKDTask) and task.table.shape == (6, NUM_CLASSES)
    assert task.get_eval_model() is model and task.get_trainable_module() is model


class _TinyNet(nn.Sequential):
    num_classes = 3

    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(12, 3))


def _ddp_worker(rank, world_size, port, out_dir):
    """Rank r trains samples {2r, 2r+1} in epoch 0 and the other rank's samples in epoch 1."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = _TinyNet()
        task = PSKDTask(model, 6, epochs=2, alpha_t=0.8, verbose=False).prepare_distributed()
        assert task.get_eval_model() is model
        g = torch.Generator().manual_seed(rank)
        x0, x1, y = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g), torch.tensor([0, 2])
        out0 = task(x0, y, torch.tensor([2 * rank, 2 * rank + 1]))
        out0['loss'].backward()
        table, seen = task.table.clone(), task.seen.clone()
        task.set_epoch(1)
        out1 = task(x1, y, torch.tensor([2 * (1 - rank), 2 * (1 - rank) + 1]))
        extra = gather_rank_states(task, None, argparse.Namespace(distributed=True, world_size=world_size))
        torch.save(dict(
            extra_keys=sorted(extra),
            prob=F.softmax(out0['output'].detach(), 1), table=table, seen=seen,
            loss1=out1['loss'].detach(), logits1=out1['output'].detach()), os.path.join(out_dir, f'{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_share_every_prediction(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method='fork')
    r0, r1 = (torch.load(tmp_path / f'{r}.pt') for r in range(2))
    assert torch.equal(r0['table'], r1['table']) and torch.equal(r0['seen'], r1['seen'])
    assert r0['seen'].tolist() == [True] * 4 + [False] * 2
    # the table is the same on every rank, so a checkpoint keeps rank 0's copy only, not one per rank (each rank's
    # RNG states are its own)
    assert r0['extra_keys'] == r1['extra_keys'] == ['rng_ranks']
    torch.testing.assert_close(r0['table'][:4], torch.cat([r0['prob'], r1['prob']]))
    # epoch 1: each rank's soft targets use the predictions the other rank made in epoch 0
    y = F.one_hot(torch.tensor([0, 2]), 3).float()
    for mine, other in ((r0, r1), (r1, r0)):
        torch.testing.assert_close(mine['loss1'], _soft_ce(mine['logits1'], 0.6 * y + 0.4 * other['prob']))


def test_indexed_loader_yields_dataset_indices():
    dataset = DigitsDataset('validation')
    loader = create_indexed_loader(
        dataset, (3, 8, 8), 16, is_training=True, no_aug=True, num_workers=0, device=torch.device('cpu'))
    batches = list(loader)
    assert len(batches) == len(loader) == len(dataset) // 16
    seen = torch.cat([batch.index for batch in batches])
    assert seen.dtype == torch.int64 and len(set(seen.tolist())) == len(seen)  # one epoch, each sample once
    for input, target, index, _ in batches:
        assert input.shape == (16, 3, 8, 8)
        assert torch.equal(target, torch.as_tensor(dataset.targets)[index])
