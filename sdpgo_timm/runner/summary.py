"""summary.csv: timm's columns then ours, one row per evaluated epoch, appended atomically; a run resumed in
place drops the rows it trains again and gets back a row its checkpoint holds (`SUMMARY_ROW`)."""
import csv
import io
import logging
import os
import shutil
from typing import Any, Dict

from .rundir import atomic_write, atomic_write_text

_logger = logging.getLogger(__name__)

# timm's summary.csv columns, in timm's order; ours follow them
_TIMM_SUMMARY = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')


def summary_row(epoch: int, train_metrics: dict, eval_metrics: dict, lr: float) -> Dict[str, Any]:
    """An epoch's summary.csv row: timm's columns (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr) in timm's
    order, then ours (train_<part>, train_steps, ..., eval_img_per_sec)."""
    row = dict(epoch=epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
               **{f'eval_{k}': v for k, v in eval_metrics.items()}, lr=lr)
    return {**{k: row[k] for k in _TIMM_SUMMARY if k in row}, **row}


def append_summary(epoch: int, train_metrics: dict, eval_metrics: dict, path: str, lr: float,
                   log_wandb: bool = False) -> None:
    """Append an epoch's `summary_row` to summary.csv, written atomically: earlier rows survive any crash or failed
    write. The columns are the file's own when it exists (a run resumed in place). With `log_wandb` the row is
    also logged to the active wandb run, as timm's update_summary does."""
    row = summary_row(epoch, train_metrics, eval_metrics, lr)
    if log_wandb:
        import wandb
        wandb.log(row)
    header = None
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, newline='') as f:
            header = next(csv.reader(f), None)

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header or list(row), extrasaction='ignore')
    if not header:
        writer.writeheader()
    writer.writerow(row)

    def write(f):
        if header:
            with open(path, 'rb') as old:
                shutil.copyfileobj(old, f)
        f.write(text.getvalue().encode())
    atomic_write(path, write)


def summary_epochs(path: str) -> list:
    """The epochs summary.csv has rows for (empty when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline='') as f:
        return [int(r['epoch']) for r in csv.DictReader(f) if r.get('epoch', '').isdigit()]


def restore_summary_row(path: str, row: Dict[str, Any]) -> None:
    """Append an epoch checkpoint's own summary row (its SUMMARY_ROW) if summary.csv lacks it: a run stopped between
    the two writes (the checkpoint is written first, so summary.csv never lists an epoch that has no checkpoint)."""
    if row['epoch'] not in summary_epochs(path):
        append_summary(row['epoch'], row['train'], row['eval'], path, lr=row['lr'])
        _logger.info(f"Restored the summary row of epoch {row['epoch']} from its checkpoint")


def truncate_summary(path: str, start_epoch: int) -> None:
    """Drop summary rows of epochs >= start_epoch (a run resumed in place trains them again)."""
    if not os.path.exists(path):
        return
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = reader.fieldnames or []
    kept = [r for r in rows if r.get('epoch', '').isdigit() and int(r['epoch']) < start_epoch]
    if len(kept) == len(rows):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, buffer.getvalue())
    _logger.info(f"Removed {len(rows) - len(kept)} summary row(s) of epochs >= {start_epoch}: they are trained again")
