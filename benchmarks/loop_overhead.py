#!/usr/bin/env python3
"""Overhead of train.py's training loop over a minimal timm loop (plain CE, no --sdpgo).

Both loops train the same timm model with the same timm loader, ClassificationTask
criterion and optimizer; epochs alternate (minimal, ours, minimal, ours, ...) after a
warm-up epoch of each, and the ratio of median images/s is printed (target >= 0.98).

    python benchmarks/loop_overhead.py --model resnet10t --img-size 32 --rounds 5
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import timm
from timm.data import create_loader
from timm.task import ClassificationTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdpgo_timm.data import DigitsDataset  # noqa: E402
from sdpgo_timm.runner.engine import LoopOptions, train_one_epoch  # noqa: E402


def minimal_epoch(model, loader, optimizer, criterion) -> float:
    """The plainest timm-style loop: forward, loss, backward, step. Returns images/s."""
    model.train()
    seen, start = 0, time.perf_counter()
    for input, target in loader:
        loss = criterion(model(input), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen += input.shape[0]
    torch.tensor(0.0).item()
    return seen / (time.perf_counter() - start)


def ours_epoch(task, loader, optimizer, epoch) -> float:
    start = time.perf_counter()
    metrics = train_one_epoch(epoch, task, loader, optimizer, LoopOptions(device=torch.device('cpu'), log_enabled=False))
    seen = metrics['samples']
    return seen / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='resnet10t')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    loader = create_loader(
        DigitsDataset('train'), input_size=(3, args.img_size, args.img_size), batch_size=args.batch_size,
        is_training=True, num_workers=0, device=torch.device('cpu'), mean=(0.5,) * 3, std=(0.5,) * 3)
    criterion = nn.CrossEntropyLoss()
    task = ClassificationTask(model, criterion=criterion, verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    minimal_epoch(model, loader, optimizer, criterion)
    ours_epoch(task, loader, optimizer, 0)
    rates = {'minimal': [], 'train.py loop': []}
    for r in range(args.rounds):
        rates['minimal'].append(minimal_epoch(model, loader, optimizer, criterion))
        rates['train.py loop'].append(ours_epoch(task, loader, optimizer, r + 1))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.model} {args.img_size}px batch {args.batch_size}, {args.rounds} interleaved epochs, "
          f"torch threads {torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:14s} median {v:8.1f} img/s  (all: {', '.join(f'{x:.0f}' for x in rates[k])})")
    print(f"  ratio train.py / minimal = {med['train.py loop'] / med['minimal']:.3f}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
