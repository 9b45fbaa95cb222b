"""Every shipped recipe names a source and only options that train.py knows."""
from pathlib import Path

import pytest
import timm

from sdpgo_timm.runner.args import create_parser, load_yaml_defaults
from sdpgo_timm.data.benchmarks import BENCHMARKS, HPARAMS_DIR

RECIPES = sorted(HPARAMS_DIR.glob('*/*.yaml'))


def test_recipes_exist_for_the_named_models():
    names = {p.relative_to(HPARAMS_DIR).as_posix() for p in RECIPES}
    for model in ('resnet50', 'resnet18', 'deit_tiny_patch16_224', 'deit_small_patch16_224',
                  'swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224'):
        assert f'imagenet/{model}.yaml' in names
    assert 'digits/default.yaml' in names


@pytest.mark.parametrize('path', RECIPES, ids=[p.relative_to(HPARAMS_DIR).as_posix() for p in RECIPES])
def test_recipe_is_valid(path: Path):
    assert path.parent.name in BENCHMARKS
    header = [line for line in path.read_text().splitlines() if line.startswith('#')]
    assert any('Source:' in line for line in header), f'{path} does not name its source'
    defaults = load_yaml_defaults(str(path), create_parser())
    if 'model' in defaults:
        assert defaults['model'] == path.stem and timm.is_model(defaults['model'])
    if 'batch_size' in defaults and (defaults.get('mixup') or defaults.get('cutmix')):
        assert defaults['batch_size'] % 4 == 0  # even fresh half for Mixup in every replay mode


def test_recipes_ship_in_the_wheel_and_an_installed_copy_finds_them(tmp_path):
    """A non-editable install (the wheel pip builds) carries hparams/ and recipe_path finds it there."""
    import os
    import subprocess
    import sys
    import zipfile
    import shutil
    source = tmp_path / 'source'  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(Path(__file__).resolve().parents[1], source, symlinks=True,
                    ignore=shutil.ignore_patterns('.git', 'build', '*.egg-info', '__pycache__', 'output'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--quiet', '-w',
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    wheel, = tmp_path.glob('sdpgo_timm-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert {f'sdpgo_timm/hparams/{p.relative_to(HPARAMS_DIR).as_posix()}' for p in RECIPES} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / 'site')
    code = 'from sdpgo_timm.data.benchmarks import recipe_path; print(recipe_path("imagenet", "resnet50"))'
    env = {k: v for k, v in os.environ.items() if k != 'SDPGO_HPARAMS_DIR'}
    found = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, check=True,
                           env={**env, 'PYTHONPATH': str(tmp_path / 'site')}, timeout=300).stdout.strip()
    assert found == str(tmp_path / 'site' / 'sdpgo_timm' / 'hparams' / 'imagenet' / 'resnet50.yaml')
