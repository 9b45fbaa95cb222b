"""The package's layers (docs/ARCHITECTURE.md): the method core stands alone, the method declarations
(methods/) sit below the runner, and the runner never reaches up into hub/ (which builds on the runner)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'sdpgo_timm'
CORE = ('sil', 'pwa', 'taps', 'protocol', 'task', 'skd')


def _imported_modules(path: Path) -> set:
    """The sdpgo_timm modules a file imports (anywhere in it, function bodies too), as dotted names."""
    package = '.'.join(path.relative_to(PACKAGE.parent).with_suffix('').parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split('.')[:len(package.split('.')) - node.level + 1] if node.level else []
            module = '.'.join([*base, *([node.module] if node.module else [])])
            found.update([module] if node.module else [f'{module}.{alias.name}' for alias in node.names])
    return {name for name in found if name.startswith('sdpgo_timm')}


def _files(*names: str):
    for name in names:
        folder = PACKAGE / name
        yield from sorted(folder.glob('*.py')) if folder.is_dir() else [PACKAGE / f'{name}.py']


@pytest.mark.parametrize('path', list(_files(*CORE, 'methods')), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_method_core_and_declarations_import_neither_the_runner_nor_hub(path):
    above = {m for m in _imported_modules(path) if m.startswith(('sdpgo_timm.runner', 'sdpgo_timm.hub'))}
    assert not above, f"{path.name} imports {sorted(above)}"


@pytest.mark.parametrize('path', list(_files('runner')), ids=lambda p: p.name)
def test_the_runner_does_not_import_hub(path):
    assert not {m for m in _imported_modules(path) if m.startswith('sdpgo_timm.hub')}


def test_importing_the_method_core_loads_neither_the_runner_nor_hub():
    """A fresh interpreter: what importing the core (and the package's face it runs) leaves in sys.modules."""
    code = (f"import sys\nimport {', '.join(f'sdpgo_timm.{m}' for m in CORE)}\n"
            "print(' '.join(m for m in sys.modules if m.startswith(('sdpgo_timm.runner', 'sdpgo_timm.hub'))))")
    loaded = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.split()
    assert loaded == []


def test_the_import_scan_sees_relative_imports():
    """The scan resolves `from ..runner.x import y` and `from . import y`, so the tests above can fail."""
    assert 'sdpgo_timm.runner.checkpoint' in _imported_modules(PACKAGE / 'hub' / 'push.py')
    assert 'sdpgo_timm.skd.dlb' in _imported_modules(PACKAGE / 'skd' / '__init__.py')
