"""DLB (Shen et al., CVPR 2022) as train.py runs it: `--skd dlb`, the preset on SDPGO's one forward (either replay
mode), and `--skd dlb2`, the authors' two forwards, which re-augments its replay half (views only). Both take the
--sdpgo-* flags (`methods.sdpgo`); DLB's values override them."""
from .base import Method
from .sdpgo import replay_task_builder

DLB = Method('dlb', flag='--skd dlb', summary='DLB preset, one forward', build_task=replay_task_builder('dlb'),
             feed='replay', replay_modes=('views', 'tensors'))
DLB2 = Method('dlb2', flag='--skd dlb2', summary='DLB as its authors run it, two forwards',
              build_task=replay_task_builder('dlb2'), feed='replay', replay_modes=('views',))
