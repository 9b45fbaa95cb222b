"""Pretrained SDPGO tags in timm's registry, and a clear error for weights missing offline.

* `register_pretrained` / `register_manifest` / `register_builtin`: `arch.tag` names in
  timm's pretrained registry, so `timm.create_model('resnet18.<tag>', pretrained=True)`
  loads published SDPGO weights. Importing sdpgo_timm runs `register_builtin()`.
* `check_model_name`: an unknown model name, with timm's close matches.
* `ensure_cached`: a clear error, naming the repository, when the Hub is offline and the
  weights are not in the local cache.
"""
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from timm.models import (
    PretrainedCfg, get_arch_pretrained_cfgs, get_pretrained_cfg, is_model, list_models, parse_model_name)

from .compat import add_pretrained_tag

__all__ = ['register_pretrained', 'register_manifest', 'register_builtin', 'ensure_cached', 'check_model_name']

MANIFEST = Path(__file__).with_name('pretrained.json')
MANIFEST_ENV = 'SDPGO_TIMM_MANIFEST'

_ENTRY_INFO_KEYS = ('top1', 'top5', 'recipe')  # manifest fields for people, not for timm
_TAG_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_\-]*')
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')  # what timm's Hub loader looks for, in order

# arch.tag -> cfg of every tag this module added to timm's registry (identical re-registration is a no-op)
_REGISTERED: Dict[str, PretrainedCfg] = {}


def check_repo_id(repo_id: str) -> None:
    problem = None if repo_id.count('/') == 1 else 'it has no namespace'
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        problem = str(e)
    if problem:
        raise ValueError(
            f"Bad repo id {repo_id!r}: {problem}. Use 'namespace/name' (your user or organisation, then the "
            f"model name), e.g. 'my-user/resnet18-sdpgo-cifar100'.")


def check_tag(tag: str) -> None:
    if not _TAG_RE.fullmatch(tag):
        raise ValueError(f'Bad pretrained tag {tag!r}: use letters, digits, _ and - (e.g. sdpgo_cifar100).')


def register_pretrained(arch: str, tag: str, *, hf_hub_id: str, **cfg: Any) -> None:
    """Make `timm.create_model(f'{arch}.{tag}', pretrained=True)` load the weights of `hf_hub_id`.

    `cfg` holds PretrainedCfg fields of these weights (num_classes, input_size, mean, std, crop_pct, ...);
    the rest comes from the architecture's default cfg. timm's own tags are never replaced; registering
    the same tag again with the same cfg is a no-op.
    """
    if '.' in arch or not is_model(arch):
        raise ValueError(f'Unknown architecture {arch!r}: pass a timm model name without tag (see timm.list_models).')
    check_tag(tag)
    check_repo_id(hf_hub_id.partition('@')[0])
    name = f'{arch}.{tag}'
    new_cfg = _tag_cfg(arch, tag, hf_hub_id, cfg)
    if name in _REGISTERED:
        if _REGISTERED[name] == new_cfg:
            return
        raise ValueError(f'{name} is already registered by sdpgo_timm with another cfg: choose a new tag.')
    if name in get_arch_pretrained_cfgs(arch):
        raise ValueError(f'{name} is one of timm\'s own pretrained tags: choose another tag for SDPGO weights.')
    add_pretrained_tag(name, new_cfg)
    _REGISTERED[name] = new_cfg


def _tag_cfg(arch: str, tag: str, hf_hub_id: str, cfg: Dict[str, Any]) -> PretrainedCfg:
    """The architecture's traits and data defaults, overridden by `cfg`; no trace of other weights."""
    base = get_pretrained_cfg(arch) or PretrainedCfg()
    keep = ('input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'crop_mode',
            'mean', 'std', 'num_classes', 'pool_size', 'first_conv', 'classifier')
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if tuple(cfg.get('input_size', base.input_size)) != tuple(base.input_size):
        cfg.setdefault('pool_size', None)  # the default cfg's pool size belongs to its input size
    try:
        return PretrainedCfg(**{
            **{k: getattr(base, k) for k in keep}, **cfg, 'hf_hub_id': hf_hub_id, 'architecture': arch, 'tag': tag,
        })
    except TypeError as e:
        raise ValueError(f'{arch}.{tag}: bad pretrained cfg field ({e}); see timm.models.PretrainedCfg.') from None


def register_manifest(path: Union[str, os.PathLike], strict: bool = True) -> List[str]:
    """Register every entry of a manifest (`{"models": [{arch, tag, hf_hub_id, ...}]}`); returns the names.

    With `strict=False` an entry that cannot be registered (e.g. an architecture this timm lacks) is
    skipped with a warning instead of raising.
    """
    names = []
    for entry in read_manifest(Path(path)):
        try:
            names.append(_register_entry(entry))
        except (ValueError, RuntimeError) as e:
            if strict:
                raise type(e)(f'{str(path)!r}: {e}') from None
            warnings.warn(f'sdpgo_timm: skipped an entry of pretrained manifest {str(path)!r}: {e}')
    return names


def _register_entry(entry: Dict[str, Any]) -> str:
    missing = [k for k in ('arch', 'tag', 'hf_hub_id') if k not in entry]
    if missing:
        raise ValueError(f'manifest entry {entry} lacks {", ".join(missing)}.')
    cfg = {k: v for k, v in entry.items() if k not in _ENTRY_INFO_KEYS + ('arch', 'tag', 'hf_hub_id')}
    register_pretrained(entry['arch'], entry['tag'], hf_hub_id=entry['hf_hub_id'], **cfg)
    return f'{entry["arch"]}.{entry["tag"]}'


def register_builtin() -> List[str]:
    """Register the package manifest, then the file named by SDPGO_TIMM_MANIFEST if set; returns the names.

    Meant to run on import: a manifest or entry that cannot be registered is skipped with a warning.
    """
    paths = [MANIFEST] + ([Path(os.environ[MANIFEST_ENV])] if os.environ.get(MANIFEST_ENV) else [])
    names = []
    for path in paths:
        try:
            names += register_manifest(path, strict=False)
        except (OSError, ValueError) as e:
            warnings.warn(f'sdpgo_timm: cannot read pretrained manifest {str(path)!r}: {e}')
    return names


def read_manifest(path: Path) -> List[Dict[str, Any]]:
    data = json.loads(path.read_text(encoding='utf-8'))
    if not isinstance(data, dict) or not isinstance(data.get('models'), list):
        raise ValueError(f'{str(path)!r} is not an SDPGO manifest: expected {{"models": [...]}}.')
    return data['models']


def ensure_cached(
        model_name: str,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        offline: Optional[bool] = None,
) -> None:
    """When the Hub is offline (HF_HUB_OFFLINE=1), raise a clear error unless `model_name`'s weights are cached:
    it names the repository, the cache folder the files would be in, and the command that fetches them.

    `model_name` is what `timm.create_model` takes ('hf-hub:ns/name[@rev]' or a registered 'arch.tag').
    Does nothing online or for weights that do not come from the Hub. timm's own offline error names
    neither the repository nor the cache; call this before `timm.create_model(..., pretrained=True)`.
    `offline=True` checks whatever HF_HUB_OFFLINE says, for weights that must never be downloaded (a
    distillation teacher's); the caller's message then says what to do.
    """
    if not (hf_constants.HF_HUB_OFFLINE if offline is None else offline):
        return
    source, model_id = parse_model_name(model_name)
    if source == 'hf-hub':
        hf_hub_id, needed = model_id, [('config.json',), _WEIGHT_FILES]
    elif source is None and is_model(model_name):
        cfg = get_pretrained_cfg(model_name)
        if cfg is None or not cfg.hf_hub_id or cfg.file or cfg.state_dict:
            return  # timm loads these weights from elsewhere
        hf_hub_id, needed = cfg.hf_hub_id, [(cfg.hf_hub_filename,) if cfg.hf_hub_filename else _WEIGHT_FILES]
    else:
        return
    repo_id, _, revision = hf_hub_id.partition('@')
    missing = [
        ' or '.join(names) for names in needed
        if not any(_is_cached(repo_id, name, revision or None, cache_dir) for name in names)
    ]
    if missing:
        folder = os.path.join(cache_dir or hf_constants.HF_HUB_CACHE,
                              repo_folder_name(repo_id=repo_id, repo_type='model'))
        fetch = f"python -c \"import timm; timm.create_model('{model_name}', pretrained=True)\""
        advice = (f" and HF_HUB_OFFLINE is set: fetch it once online with {fetch}, or unset HF_HUB_OFFLINE"
                  if offline is None else '')
        raise LocalEntryNotFoundError(
            f"Hugging Face Hub repository '{hf_hub_id}' (for {model_name!r}) is not in the local cache "
            f"({', '.join(missing)} missing from {folder!r}){advice}.")


def _is_cached(repo_id: str, filename: str, revision: Optional[str], cache_dir) -> bool:
    path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return isinstance(path, str)


def check_model_name(name: str, what: str) -> None:
    """A ValueError for a model name timm does not know (a Hub model, `hf-hub:...`, passes), listing close
    matches; `what` names it in the message ('model', 'teacher --kd-model-name')."""
    if parse_model_name(name)[0] != 'hf-hub' and not is_model(name.split('.')[0]):
        close = list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"unknown {what} {name!r}; similar timm models: {close}")
