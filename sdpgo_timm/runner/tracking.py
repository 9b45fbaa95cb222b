"""Experiment tracking with Weights & Biases, as timm's train.py does it (`--log-wandb`).

wandb stays optional: without it a run logs one warning line and goes on, as timm's does.
Each epoch's summary.csv row is logged, the self-distillation columns included.
"""
import argparse
import logging

_logger = logging.getLogger(__name__)


def start_wandb(args: argparse.Namespace, name: str) -> bool:
    """Start the wandb run of --log-wandb; whether rows are to be logged (False without the flag or the package)."""
    if not args.log_wandb:
        return False
    try:
        import wandb
    except ImportError:
        _logger.warning("--log-wandb: the wandb package is not installed, so metrics are not logged to wandb "
                        "(pip install wandb)")
        return False
    resume_id = args.wandb_resume_id or None
    wandb.init(project=args.wandb_project, name=name, config=vars(args), tags=args.wandb_tags,
               resume='must' if resume_id else None, id=resume_id)
    return True
