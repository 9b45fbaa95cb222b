"""Our scripts against timm's command lines: every timm flag is accepted, or listed as not yet accepted.

tests/data/timm_<script>_flags.txt is extracted from timm's train.py / validate.py (the commit is named
in its first line); timm_<script>_flags_missing.txt lists the ones not accepted yet. A flag we lose, or
one accepted but still listed as missing, fails here instead of in a user's command line.
"""
from pathlib import Path

import pytest

from sdpgo_timm.runner.args import create_parser, create_validate_parser

DATA = Path(__file__).parent / 'data'


def _read(name: str) -> set:
    return {line.strip() for line in (DATA / name).read_text().splitlines() if line.strip() and line[0] != '#'}


@pytest.mark.parametrize('script, parser', [('train', create_parser), ('validate', create_validate_parser)])
def test_every_timm_flag_is_accepted_or_listed_as_missing(script, parser):
    ours = {option for action in parser()._actions for option in action.option_strings}
    timm, missing = _read(f'timm_{script}_flags.txt'), _read(f'timm_{script}_flags_missing.txt')
    assert missing <= timm, f'listed as missing but not a timm flag: {sorted(missing - timm)}'
    assert not (missing & ours), f'accepted now, remove from the missing list: {sorted(missing & ours)}'
    assert timm - missing <= ours, f'timm flags lost: {sorted(timm - missing - ours)}'
