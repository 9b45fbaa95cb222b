"""SDPGO self-distillation for PyTorch Image Models (timm)."""
from .skd import DLB_PRESET, create_skd_task
from .factory import ModelAndTask, create_model_and_task
from .pretrained import ensure_cached, register_builtin, register_manifest, register_pretrained
from .task import SDPGOTask, half_batch_size
from .version import __version__

register_builtin()
