""" Share SDPGO weights on the Hugging Face Hub and reuse them by name.

* `push_checkpoint`: a timm training checkpoint (or a model) -> ONE Hub commit holding
  `model.safetensors`, timm's `config.json` and a model card. Optimizer and SDPGO task
  state never leave the machine.
* With `manifest=` and `tag=`, the push also appends a pinned entry to a pretrained
  manifest (see sdpgo_timm.pretrained for registering tags).

Run `python -m sdpgo_timm.hub push CHECKPOINT NAMESPACE/NAME` to push from the shell.
"""
import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import yaml
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCardData, get_token
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

import timm
from timm.models import (
    clean_state_dict,
    get_pretrained_cfg,
    is_model,
    parse_model_name,
    save_for_hf,
    split_model_name_tag,
)
from timm.utils import unwrap_model

from ..pretrained import check_repo_id, check_tag, read_manifest
from ..runner.checkpoint import load_checkpoint_file, load_weights_into
from ..runner.setup import create_timm_model

__all__ = ['push_checkpoint', 'main']

PAPER_TITLE = 'Efficient Self-Distillation Training Meets Proximal Gradient Optimization'
CITATION = """@misc{su_sdpgo,
  title  = {Efficient Self-Distillation Training Meets Proximal Gradient Optimization},
  author = {Su, Tongtong and Liao, Yun and Zheng, Fengbo},
}"""

_DATA_ARGS = ('input_size', 'img_size', 'in_chans', 'crop_pct', 'crop_mode', 'mean', 'std', 'interpolation')
_RECIPE_ARGS = ('model', 'dataset', 'epochs', 'batch_size', 'lr', 'opt', 'weight_decay', 'sched')
_ENTRY_CFG_KEYS = ('num_classes', 'input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std', 'license')
_DATASET_PREFIXES = ('torch', 'tfds', 'wds', 'hfds', 'hfids')


# ---------------------------------------------------------------------------------------------------------------------
# Push


def push_checkpoint(
        checkpoint_or_model: Union[str, os.PathLike, nn.Module],
        repo_id: str,
        *,
        use_ema: bool = False,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Upload SDPGO checkpoint',
        model_name: Optional[str] = None,
        summary_csv: Optional[Union[str, os.PathLike]] = None,
        args_yaml: Optional[Union[str, os.PathLike]] = None,
        label_names: Optional[Sequence[str]] = None,
        license: str = 'apache-2.0',
        manifest: Optional[Union[str, os.PathLike]] = None,
        tag: Optional[str] = None,
) -> str:
    """Push weights, timm config and model card to `repo_id` in one commit; returns the commit url.

    `checkpoint_or_model` is a timm model or a timm training checkpoint (`.pth.tar`); for a checkpoint,
    `summary.csv` and `args.yaml` beside it fill the card's metrics and recipe unless given. Every input is
    checked, and the repository content written locally, before anything is sent. With `manifest` and `tag`,
    an entry for `arch.tag`, pinned to the new commit, is added to that manifest file after the push.
    """
    check_repo_id(repo_id)
    if (manifest is None) != (tag is None):
        raise ValueError('Pass both `manifest` and `tag` (or neither) to record the push in a manifest.')
    if tag is not None:
        check_tag(tag)
    token = _hub_token(token)

    model, args, epoch, folder = _source(checkpoint_or_model, use_ema)
    args_yaml = args_yaml or _beside(folder, 'args.yaml')
    summary_csv = summary_csv or _beside(folder, 'summary.csv')
    if args_yaml is not None:
        args = {**_read_args_yaml(Path(args_yaml)), **args}
    metrics = _read_summary(Path(summary_csv)) if summary_csv is not None else {}

    api = HfApi(token=token, library_name='sdpgo-timm')
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        config = _write_weights_and_config(folder, model, args, label_names, license)
        card = _model_card(
            repo_id, config, args, metrics,
            title=model_name or repo_id.split('/')[-1], epoch=epoch, ema=use_ema, license=license,
        )
        (folder / 'README.md').write_text(card, encoding='utf-8')
        entry = None
        if manifest is not None:
            entry = _manifest_entry(config, tag, repo_id, metrics, args)
            _check_new_tag(Path(manifest), entry)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, hf_constants.DEFAULT_REVISION):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.create_commit(
                repo_id,
                operations=[CommitOperationAdd(p.name, str(p)) for p in sorted(folder.iterdir())],
                commit_message=commit_message,
                revision=revision,
            )
        except HfHubHTTPError as e:
            raise HubError(f"the Hub refused the push: {str(e).splitlines()[0]}") from None
        except Exception as e:
            if not _is_network_error(e):
                raise
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HubError(f"cannot reach the Hub at {hf_constants.ENDPOINT} ({reason}); check the network or "
                           "HF_ENDPOINT, then push again") from None
    if entry is not None:
        entry['hf_hub_id'] = f'{repo_id}@{commit.oid}'  # pinned: later pushes do not change what the tag loads
        _append_manifest_entry(Path(manifest), entry)
    return commit.commit_url


def check_push_target(repo_id: str) -> None:
    """ValueErrors for a push that cannot happen (bad repo id, offline, no token), checked before training."""
    check_repo_id(repo_id)
    _hub_token(None)


class HubError(RuntimeError):
    """The Hub refused the push or could not be reached; nothing local was changed."""


def _is_network_error(error: Exception) -> bool:
    """Whether an exception is a failed connection (OSError, or the HTTP client's transport/timeout errors)."""
    names = {c.__name__ for c in type(error).__mro__}
    return isinstance(error, OSError) or bool(names & {'TransportError', 'ConnectionError', 'Timeout',
                                                        'TimeoutException'})


def _hub_token(token: Optional[str]) -> str:
    """The token to push with; fails before any work when offline or not logged in (never shows the token)."""
    if hf_constants.HF_HUB_OFFLINE:
        raise ValueError('Cannot push: HF_HUB_OFFLINE is set. Unset HF_HUB_OFFLINE to reach the Hub.')
    token = token or get_token()
    if not token:
        raise ValueError('Cannot push: no Hugging Face token. Set HF_TOKEN, run `hf auth login`, or pass token=.')
    return token


def _source(checkpoint_or_model: Union[str, os.PathLike, nn.Module], use_ema: bool):
    """(model, training args, epoch, folder of the checkpoint) of what is being pushed."""
    if not isinstance(checkpoint_or_model, nn.Module):
        path = Path(checkpoint_or_model)
        return (*_model_from_checkpoint(path, use_ema), path.parent)
    if use_ema:
        raise ValueError('use_ema selects the EMA weights of a checkpoint: to push a model, pass the EMA model.')
    model = unwrap_model(checkpoint_or_model)
    if not hasattr(model, 'pretrained_cfg'):
        raise ValueError(f'{type(model).__name__} is not a timm model: create it with timm.create_model().')
    return model, {}, None, None


def _beside(folder: Optional[Path], name: str) -> Optional[Path]:
    return folder / name if folder is not None and (folder / name).is_file() else None


def _model_from_checkpoint(path: Path, use_ema: bool):
    """Rebuild the timm model of a training checkpoint: (model, args dict, epoch)."""
    checkpoint = load_checkpoint_file(str(path))
    args = checkpoint.get('args') or {}
    args = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    arch = args.get('model') or checkpoint.get('arch')  # timm writes the class name as 'arch' without args
    if not arch:
        raise ValueError(f"{str(path)!r} names no architecture (no 'args.model' nor 'arch'): re-save it with args.")
    _check_arch(arch, path)

    key = 'state_dict_ema' if use_ema else 'state_dict'
    if key not in checkpoint:
        raise ValueError(f"{str(path)!r} has no EMA weights ('state_dict_ema'): push without --use-ema.")
    # the model as training built it (the one builder of train.py and validate.py), without its start-up weights
    build = argparse.Namespace(**{
        'gp': None, 'model_kwargs': {}, **args, 'model': arch, 'pretrained': False, 'pretrained_path': None,
        'initial_checkpoint': '', 'fast_norm': False, 'grad_checkpointing': False,
        'num_classes': _num_classes(arch, clean_state_dict(checkpoint[key]), args, path)})
    model = create_timm_model(build)
    load_weights_into(model, checkpoint, str(path), f"timm.create_model({arch!r}) of the checkpoint's args",
                      use_ema=use_ema)
    return model, args, checkpoint.get('epoch')


def _check_arch(arch: str, path: Path) -> None:
    try:
        source, _ = parse_model_name(arch)
    except ValueError as e:
        raise ValueError(f'{str(path)!r}: bad architecture name: {e}') from None
    if source is None and not is_model(arch):
        raise ValueError(
            f'{str(path)!r}: unknown architecture {arch!r} (timm {timm.__version__} has no such model). '
            f'Upgrade timm, or import the module that registers it before pushing.')


def _num_classes(arch: str, state_dict: Dict[str, Any], args: Dict[str, Any], path: Path) -> int:
    """Classes of the saved head: the classifier weight's rows, else the training args."""
    cfg = get_pretrained_cfg(split_model_name_tag(arch)[0]) if is_model(arch) else None
    classifier = cfg.classifier if cfg is not None else None
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    weight = state_dict.get(f'{classifier}.weight') if classifier else None
    if weight is not None:
        return weight.shape[0]
    if args.get('num_classes') is not None:
        return int(args['num_classes'])
    raise ValueError(f'{str(path)!r}: cannot tell the number of classes (no classifier weight, no args.num_classes).')


def _read_args_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ValueError(f'args file {str(path)!r} does not exist: pass the run\'s args.yaml, or leave --args-yaml '
                         'out (the one beside the checkpoint is used when there is one).')
    try:
        args = yaml.safe_load(path.read_text(encoding='utf-8'))
    except yaml.YAMLError as e:
        raise ValueError(f'{str(path)!r} is not plain YAML (it is read with yaml.safe_load): {e}'.replace('\n', ' '))
    if not isinstance(args, dict):
        raise ValueError(f'{str(path)!r} is not an args.yaml written by training (expected a mapping).')
    return args


def _read_summary(path: Path) -> Dict[str, Any]:
    """Best eval top-1 (and the top-5 of that epoch) and the epoch count of a timm summary.csv."""
    if not path.is_file():
        raise ValueError(f'summary file {str(path)!r} does not exist: pass the run\'s summary.csv, or leave '
                         '--summary-csv out (the one beside the checkpoint is used when there is one).')
    try:
        with path.open(newline='', encoding='utf-8') as f:
            rows = [r for r in csv.DictReader(f) if r.get('eval_top1')]
        if not rows:
            return {}
        best = max(rows, key=lambda r: float(r['eval_top1']))
        epochs = len({r.get('epoch', i) for i, r in enumerate(rows)})  # a resumed run may repeat an epoch
        metrics = dict(top1=round(float(best['eval_top1']), 3), epochs=epochs)
        if best.get('epoch'):
            metrics['best_epoch'] = int(best['epoch'])
        if best.get('eval_top5'):
            metrics['top5'] = round(float(best['eval_top5']), 3)
    except (csv.Error, UnicodeDecodeError, ValueError, TypeError) as e:
        raise ValueError(f"summary file {str(path)!r} is damaged ({type(e).__name__}: {' '.join(str(e).split())}): "
                         "pass a summary.csv written by training with --summary-csv, or move the damaged one "
                         "away") from None
    return metrics


def _write_weights_and_config(
        folder: Path,
        model: nn.Module,
        args: Dict[str, Any],
        label_names: Optional[Sequence[str]],
        license: str,
) -> Dict[str, Any]:
    """`model.safetensors` + timm's `config.json`, preprocessing taken from the training args; returns the config."""
    data_config = {k: args[k] for k in _DATA_ARGS if args.get(k) not in (None, '')}
    # describe these weights, not the source weights the model's default cfg points at
    pretrained_cfg = dict(tag=None, origin_url=None, paper_ids=None, notes=None, license=license, paper_name=PAPER_TITLE)
    model_config = dict(pretrained_cfg=pretrained_cfg)
    if label_names:
        if len(label_names) != model.num_classes:
            raise ValueError(f'{len(label_names)} label names for a {model.num_classes}-class model.')
        model_config['label_names'] = list(label_names)
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True, data_config=data_config)
    return json.loads((folder / 'config.json').read_text())


# ---------------------------------------------------------------------------------------------------------------------
# Model card


def _dataset_name(args: Dict[str, Any]) -> Optional[str]:
    """timm's `--dataset` without its reader prefix ('torch/cifar100' -> 'cifar100')."""
    name = str(args.get('dataset') or '')
    prefix, _, rest = name.partition('/')
    return (rest if prefix in _DATASET_PREFIXES else name) or None


def _recipe(args: Dict[str, Any]) -> Dict[str, Any]:
    keys = [k for k in _RECIPE_ARGS if k in args] + sorted(k for k in args if k.startswith(('sdpgo', 'skd')))
    return {k: json.loads(json.dumps(args[k], default=str)) for k in keys}  # plain YAML/JSON values


def _model_card(
        repo_id: str,
        config: Dict[str, Any],
        args: Dict[str, Any],
        metrics: Dict[str, Any],
        *,
        title: str,
        epoch: Optional[int],
        ema: bool,
        license: str,
) -> str:
    dataset = _dataset_name(args)
    results = []
    if dataset and 'top1' in metrics:
        results = [
            EvalResult(
                task_type='image-classification', dataset_type=dataset, dataset_name=dataset,
                metric_type='accuracy', metric_name=f'Top-{k} accuracy', metric_value=metrics[f'top{k}'],
            ) for k in (1, 5) if f'top{k}' in metrics
        ]
    card_data = ModelCardData(
        library_name='timm', license=license, tags=['image-classification', 'timm', 'sdpgo'],
        pipeline_tag='image-classification', datasets=[dataset] if dataset else None,
        model_name=repo_id, eval_results=results or None,
    )
    cfg = config['pretrained_cfg']
    lines = [
        '---', card_data.to_yaml(), '---',
        f'# Model card for {title}', '',
        f'A `{config["architecture"]}` image classifier trained with SDPGO self-distillation '
        f'("{PAPER_TITLE}", Su, Liao and Zheng) with sdpgo-timm.', '',
        '## Model Details', '',
        f'- **Architecture:** {config["architecture"]}',
        f'- **Classes:** {config["num_classes"]}',
        f'- **Input size:** {"x".join(str(v) for v in cfg["input_size"])}',
        f'- **Weights:** {"EMA" if ema else "model"} weights' + (f' of epoch {epoch}' if epoch is not None else ''),
    ]
    if dataset:
        lines.append(f'- **Dataset:** {dataset}')
    if metrics:
        lines += ['', '## Results', '', '| metric | value |', '|---|---|']
        lines += [f'| best eval top-1 | {metrics["top1"]} |']
        lines += [f'| eval top-5 at that epoch | {metrics["top5"]} |'] if 'top5' in metrics else []
        lines += [f'| best epoch | {metrics["best_epoch"]} |'] if 'best_epoch' in metrics else []
        lines += [f'| epochs trained | {metrics["epochs"]} |']
    recipe = _recipe(args)
    if recipe:
        lines += ['', '## Training recipe', '', '```yaml', yaml.safe_dump(recipe, sort_keys=False).strip(), '```']
    lines += [
        '', '## Usage', '', '```python', 'import timm', 'import torch', '',
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
        'data_config = timm.data.resolve_model_data_config(model)',
        'transform = timm.data.create_transform(**data_config, is_training=False)',
        '# logits = model(transform(image).unsqueeze(0))', '```',
        '', '## Citation', '', '```bibtex', CITATION, '```', '',
    ]
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Manifest entries written by a push


def _manifest_entry(
        config: Dict[str, Any],
        tag: str,
        hf_hub_id: str,
        metrics: Dict[str, Any],
        args: Dict[str, Any],
) -> Dict[str, Any]:
    cfg = config['pretrained_cfg']
    entry = dict(arch=config['architecture'], tag=tag, hf_hub_id=hf_hub_id)
    entry.update({k: cfg[k] for k in _ENTRY_CFG_KEYS if cfg.get(k) is not None})
    entry.update({k: metrics[k] for k in ('top1', 'top5') if k in metrics})
    entry['recipe'] = _recipe(args)
    return entry


def _check_new_tag(path: Path, entry: Dict[str, Any]) -> None:
    name = f'{entry["arch"]}.{entry["tag"]}'
    if path.exists() and any(f'{m["arch"]}.{m["tag"]}' == name for m in read_manifest(path)):
        raise ValueError(f'{name} is already in {str(path)!r}: published tags never change, choose a new tag.')


def _append_manifest_entry(path: Path, entry: Dict[str, Any]) -> None:
    models = read_manifest(path) if path.exists() else []
    path.write_text(json.dumps({'models': models + [entry]}, indent=2) + '\n', encoding='utf-8')


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m sdpgo_timm.hub', description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    push = commands.add_parser('push', help='push a training checkpoint to the Hugging Face Hub')
    push.add_argument('checkpoint', help='timm training checkpoint (.pth.tar)')
    push.add_argument('repo_id', help='namespace/name on the Hub')
    push.add_argument('--use-ema', action='store_true', help="push the EMA weights ('state_dict_ema')")
    push.add_argument('--private', action='store_true', help='create the repository private')
    push.add_argument('--revision', default=None, help='branch to commit to (created if missing)')
    push.add_argument('--commit-message', default='Upload SDPGO checkpoint')
    push.add_argument('--license', default='apache-2.0')
    push.add_argument('--model-name', default=None, help='title of the model card')
    push.add_argument('--summary-csv', default=None, help='default: summary.csv beside the checkpoint')
    push.add_argument('--args-yaml', default=None, help='default: args.yaml beside the checkpoint')
    push.add_argument('--manifest', default=None, help='manifest to record the push in (with --tag)')
    push.add_argument('--tag', default=None, help='pretrained tag for the manifest entry (with --manifest)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`push`: exit 0 and print the commit url; 2 on bad input; 1 when the Hub refuses."""
    args = _parser().parse_args(argv)
    try:
        url = push_checkpoint(
            args.checkpoint, args.repo_id, use_ema=args.use_ema, private=args.private, revision=args.revision,
            commit_message=args.commit_message, model_name=args.model_name, summary_csv=args.summary_csv,
            args_yaml=args.args_yaml, license=args.license, manifest=args.manifest, tag=args.tag,
        )
    except ValueError as e:
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return 2
    except HubError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the Hub makes a commit whole or not at all
        print('error: interrupted (Ctrl-C) during the push: the Hub makes a commit whole or not at all, so the '
              'repository holds this push only if its commit was made; run the same command again (unchanged files '
              'make no new commit)', file=sys.stderr)
        return 130
    print(url)
    return 0
