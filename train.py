#!/usr/bin/env python3
"""timm training with SDPGO self-distillation: timm's train.py workflow plus --sdpgo.

    python train.py digits --model resnet18 --sdpgo
    torchrun --nproc_per_node=8 train.py imagenet --model swin_tiny_patch4_window7_224 --sdpgo

Argument parsing, the Hub push and main only; the run's phases live in sdpgo_timm.runner.session.
"""
import logging
import sys
from contextlib import ExitStack

from sdpgo_timm.runner import errors
from sdpgo_timm.runner.args import parse_args
from sdpgo_timm.runner.errors import PushFailed, RunError
from sdpgo_timm.runner.preemption import Interrupted
from sdpgo_timm.runner.session import TrainSession
from sdpgo_timm.runner.setup import setup_script_logging

_logger = logging.getLogger('train')


class Session(TrainSession):
    """train.py's run: the runner's session, plus the Hugging Face Hub push of --push-to-hub."""

    def check_push_target(self) -> None:
        from sdpgo_timm.hub import check_push_target
        check_push_target(self.args.push_to_hub)

    def push(self, path: str) -> str:
        from sdpgo_timm.hub import HubError, push_checkpoint
        try:
            with self.preemption.raising():  # an upload has no step to stop at: a signal stops it at once
                return push_checkpoint(path, self.args.push_to_hub, use_ema=self.task.has_ema())
        except (HubError, Interrupted) as e:  # the run is complete and saved; only the upload is left to do
            reason = f"the push was interrupted by {e}" if isinstance(e, Interrupted) else str(e)
            raise PushFailed(f"{reason}. The run itself is complete in {self.output_dir!r}: push it later with "
                             f"python -m sdpgo_timm.hub push {path} {self.args.push_to_hub}") from None


def run(args, args_text: str, cleanup: ExitStack) -> dict:
    """Train as `args` say (`sdpgo_timm.runner.session`); the run folder's lock is released when `cleanup` closes."""
    return Session(args, args_text, cleanup).run()


def main(argv=None) -> int:
    """The exit status of sdpgo_timm.runner.errors: 0 done, 1 trained but the Hub push failed, 2 bad input, 3
    non-finite loss, 4 preempted or Ctrl-C (resume with --resume auto), 5 a write failed, 6 out of memory, 130 a
    second Ctrl-C."""
    setup_script_logging()
    args = None
    try:
        args, args_text = parse_args(argv)
        with ExitStack() as cleanup:
            run(args, args_text, cleanup)
    except RunError as e:
        _logger.error(e.line())
        return e.exit_status
    except ValueError as e:  # bad input found by timm or torch while setting up
        _logger.error(f"error: {e}")
        return errors.BAD_INPUT
    except (RuntimeError, MemoryError) as e:
        oom = errors.out_of_memory(e, args.batch_size) if args is not None else None
        if oom is None:
            raise
        _logger.error(oom.line())
        return oom.exit_status
    except KeyboardInterrupt:
        _logger.error("error: interrupted twice (Ctrl-C): stopped at once, without a recovery checkpoint; the "
                      "checkpoints already written are intact")
        return errors.INTERRUPTED
    return errors.DONE


if __name__ == '__main__':
    sys.exit(main())
