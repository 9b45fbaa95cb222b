"""Share weights through the Hugging Face Hub: push a checkpoint with its config and model card, optionally
adding a pretrained tag to a manifest (`sdpgo_timm.pretrained` registers the tags). `python -m sdpgo_timm.hub
push ...` is the command line."""
from .push import CITATION, PAPER_TITLE, HubError, check_push_target, main, push_checkpoint
