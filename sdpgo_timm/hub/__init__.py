"""Share weights through the Hugging Face Hub: push a checkpoint with its config and model card (`push`), and
load pushed weights by pretrained tag (`pretrained`). `python -m sdpgo_timm.hub push ...` is the command line."""
from .pretrained import (
    check_repo_id, check_tag, ensure_cached, register_builtin, register_manifest, register_pretrained)
from .push import CITATION, PAPER_TITLE, HubError, check_push_target, main, push_checkpoint
