"""Benchmark names accepted in place of a data directory, and their recipes and data.

`train.py digits ...` uses the embedded digits set; `train.py fashion-mnist ...` reads the
Fashion-MNIST IDX files from --data-dir, $FASHION_MNIST_DIR or Debian's folder (both are
in-memory datasets of this package); `train.py imagenet ...` reads an ImageFolder (train/ and
validation/ or val/) from --data-dir or $IMAGENET_DIR. Each name may have YAML recipes in
hparams/<name>/<model>.yaml (or default.yaml) that set defaults.
"""
import os
from pathlib import Path
from typing import Dict, Optional

# benchmark name -> environment variable naming its image folder (None: an in-memory dataset of this package,
# which finds its own data: see IN_MEMORY)
BENCHMARKS: Dict[str, Optional[str]] = {
    'digits': None,
    'fashion-mnist': None,
    'imagenet': 'IMAGENET_DIR',
}
IN_MEMORY = tuple(name for name, env in BENCHMARKS.items() if env is None)

# the recipes ship inside the package (sdpgo_timm/hparams, also reachable as hparams/ at the checkout's top), so
# that an installed copy finds them as well as a checkout does
HPARAMS_DIR = Path(os.environ.get('SDPGO_HPARAMS_DIR', Path(__file__).resolve().parents[1] / 'hparams'))


def recipe_path(benchmark: str, model: str) -> Optional[Path]:
    """hparams/<benchmark>/<model>.yaml, else hparams/<benchmark>/default.yaml, else None."""
    for name in (model, 'default'):
        path = HPARAMS_DIR / benchmark / f'{name}.yaml'
        if path.is_file():
            return path
    return None


def resolve_data_dir(data: Optional[str], data_dir: Optional[str]) -> Optional[str]:
    """The data folder for the positional argument (a folder or a benchmark name) and --data-dir.

    Returns None for the in-memory benchmarks (their datasets resolve --data-dir themselves).
    Raises ValueError naming the fix when nothing fits.
    """
    if data in BENCHMARKS:
        env = BENCHMARKS[data]
        if env is None:
            return None
        path = data_dir or os.environ.get(env)
        if not path:
            raise ValueError(f"benchmark {data!r} needs its data folder: pass --data-dir DIR or set {env}")
    else:
        path = data or data_dir
        if path is None:
            raise ValueError(
                f"no data given: pass a data folder or a benchmark name ({', '.join(BENCHMARKS)})")
        if not os.path.exists(path) and os.sep not in path and not path.startswith('.'):
            raise ValueError(
                f"{path!r} is neither a folder nor a known benchmark; known benchmarks: {', '.join(BENCHMARKS)}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"data folder {path!r} is a file, not a folder; pass the folder that holds the splits")
    if not os.path.isdir(path):
        raise ValueError(f"data folder {path!r} does not exist; check --data-dir (or the benchmark's variable)")
    return path
