"""The training methods of train.py, each declared once (a `Method`, in its own module), and their registry.

`--sdpgo`, `--skd NAME` and `--kd-model-name` are resolved once, at parse time, into one registry name
(`args.method`, `resolve_method`); every later step reads the method's declaration (`get_method`), so the runner
names no method. Adding a method is one module that declares it, one `register_method` line below, and its tests.
"""
import argparse
from typing import Any, Dict, Mapping, Optional

from .base import Method, bce_active, mixup_active
from .ce import CE
from .dlb import DLB, DLB2
from .kd import KD
from .pskd import PSKD
from .sdpgo import SDPGO

METHODS: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add `method` to the registry (a self-distillation method becomes a choice of --skd)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


for _method in (CE, SDPGO, DLB, DLB2, PSKD, KD):
    register_method(_method)


def get_method(name: str) -> Method:
    return METHODS[name]


def recorded_method(options: Mapping[str, Any]) -> Optional[str]:
    """The self-distillation method that a run's args (a checkpoint's, as a dict) chose, from the flags every
    release saves; None for a run without one."""
    return SDPGO.name if options.get('sdpgo') else options.get('skd')


def resolve_method(args: argparse.Namespace) -> str:
    """The registry name of the method `args` choose: --sdpgo (or --skd sdpgo), --skd NAME, timm's teacher
    distillation with --kd-model-name, else plain CE. A ValueError for two choices at once."""
    if args.sdpgo and args.skd not in (None, SDPGO.name):
        raise ValueError(f"--sdpgo and --skd {args.skd} both given; pick one")
    name = recorded_method(vars(args))
    teacher = getattr(args, 'kd_model_name', None)
    if teacher and name:
        raise ValueError(f"--kd-model-name {teacher} and {'--sdpgo' if args.sdpgo else f'--skd {args.skd}'}: teacher "
                         "distillation and self-distillation are alternatives; drop one")
    if getattr(args, 'kd_checkpoint', None) and not teacher:
        raise ValueError(f"--kd-checkpoint {args.kd_checkpoint} needs --kd-model-name, the teacher's architecture")
    return name or (KD.name if teacher else CE.name)


__all__ = ['METHODS', 'Method', 'bce_active', 'get_method', 'mixup_active', 'recorded_method', 'register_method',
           'resolve_method']
