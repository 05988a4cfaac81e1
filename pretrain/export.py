"""`ssmforge export RUN_DIR OUT`: a checkpoint of any ZeRO stage -> one model folder
(config.json + model.safetensors, Hugging Face's format for Mamba) that models.load_pretrained reads,
with the run's tokenizer copied beside it and the run's settings in `ssmforge_run.yaml` (RUN_FILE), so
that eval-ppl and finetune-glue on the folder read what they would read in the run folder.

Importing this module loads no torch: the CLI checks a checkpoint folder with it before loading a model.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ssmforge.errors import CheckpointError, DataError

from .config import RunConfig, load_config, to_yaml

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUN_FILE = "ssmforge_run.yaml"
CONFIG_FILE = "config.json"  # models.hf.CONFIG_FILE, named here too: that module loads torch
# sections of the run config left out of RUN_FILE: where and how the run was submitted and logged, which
# no later stage reads and which name the run's cluster account and wandb team
RUN_FILE_DROPS = ("slurm", "wandb")
RUN_FILE_HEADER = """\
# The settings of the run this model was exported from (written by `ssmforge export`, copied by `convert`).
# eval-ppl and finetune-glue read it as they read a run folder's config.yaml: data.seq_len (or eval.max_length)
# is eval-ppl's default window, eval.* its other defaults; glue.*, train.precision/betas/grad_clip and
# deepspeed.* configure finetune-glue. Command-line flags and key=value overrides win over it.
# The weights load from config.json + model.safetensors; the model section here is the run's, for the record.
# Source: {source}
"""


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of one checkpoint, gathered from ZeRO partitions where there are any."""
    import torch

    folder = checkpoint_dir / tag
    if any(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    path = folder / "mp_rank_00_model_states.pt"
    if not path.exists():
        raise CheckpointError(f"{folder}: no model states (expected mp_rank_00_model_states.pt or ZeRO files)")
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "checkpoints").is_dir()


def _listing(path: Path, what: str) -> set[str]:
    """The names in a folder, or one line saying why it cannot be read."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found (expected {what})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected {what})")
    try:
        return set(os.listdir(path))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the folder ({e.strerror})") from None


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def check_run_folder(path: str | Path, tag: str | None = None) -> None:
    """A run folder with a checkpoint to load (`tag`, default the latest), checked without loading it."""
    path = Path(path)
    names = _listing(path, "a run folder with config.yaml and checkpoints/")
    if "config.yaml" not in names:
        raise CheckpointError(f"{path}: not a run folder (no config.yaml)")
    _check_readable(path / "config.yaml")
    if not (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path}: the run has no checkpoints/ yet (nothing to load)")
    checkpoints = _listing(path / "checkpoints", "the run's checkpoints")
    if tag is not None and tag not in checkpoints:
        raise CheckpointError(f"{path / 'checkpoints'}: no checkpoint named {tag}")
    if tag is None and "latest" not in checkpoints:
        raise CheckpointError(f"{path / 'checkpoints'}: no checkpoint to load (no 'latest' yet)")


def check_checkpoint(path: str | Path) -> None:
    """What eval-ppl, finetune-glue, generate and convert read, checked before torch loads: a run folder
    with a checkpoint, or a model folder (ssmforge export or Hugging Face) with a readable config.json."""
    path = Path(path)
    names = _listing(path, "a run folder or a model folder")
    if is_run_folder(path) or ("config.yaml" in names and CONFIG_FILE not in names):
        return check_run_folder(path)
    if CONFIG_FILE not in names:
        raise CheckpointError(f"{path / CONFIG_FILE}: file not found (expected a model folder, or a run folder with "
                              f"config.yaml and checkpoints/)")
    _check_readable(path / CONFIG_FILE)


def settings_file(path: str | Path) -> Path | None:
    """The run config that comes with a checkpoint: a run folder's config.yaml, an export's RUN_FILE, or
    None (a Hugging Face folder, an export from before RUN_FILE)."""
    path = Path(path)
    if is_run_folder(path):
        return path / "config.yaml"
    return path / RUN_FILE if (path / RUN_FILE).is_file() else None


def run_settings(path: str | Path, overrides: list[str] | tuple[str, ...] = (), config: str | Path | None = None,
                 defaults: bool = False) -> RunConfig | None:
    """The run config the later stages read for a checkpoint, with `key=value` overrides applied: the YAML
    `config` when given, else the checkpoint's own (settings_file; read as frozen: older key layouts
    convert), else the defaults (with run_dir the checkpoint) when `defaults`, else None."""
    own = settings_file(path)
    if config is not None:
        return load_config(config, overrides)
    if own is not None:
        return load_config(own, overrides, frozen=True)
    if defaults or overrides:
        return load_config(None, [f"run_dir={json.dumps(str(path))}", *overrides])
    return None


def load_run_model(run_dir: str | Path, tag: str | None = None):
    """(model, run config, tag) with the weights of a run's checkpoint (default: the latest)."""
    from ssmforge.models import LanguageModel

    from . import integrity
    from .checkpoint import latest_tag

    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: not found; {run_dir} is not a run folder")
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise CheckpointError(f"{checkpoint_dir}: no checkpoint{f' named {tag}' if tag else ''} to load")
    problem = integrity.verify(checkpoint_dir / tag)
    if problem is not None:
        raise CheckpointError(f"{problem}; not loading it (pretraining resumes from the newest intact checkpoint)")
    config = load_config(config_path, frozen=True)
    model = LanguageModel(config.model)
    state = consolidated_state_dict(checkpoint_dir, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.model.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint_dir / tag}: weights do not match {config_path} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model, config, tag


def run_tokenizer_info(config) -> dict | None:
    """The tokenizer record of a run's manifest (kind, file, special ids), or None for remote shards."""
    from ssmforge.data_pipeline.loader import open_manifest
    from ssmforge.data_pipeline.manifest import is_remote

    if is_remote(config.data.shard_dir):
        return None
    return open_manifest(config.data.shard_dir, config.data.cache_dir).tokenizer


def load_model_and_tokenizer(path: str | Path):
    """(model, tokenizer or None, run config or None) from a run folder (latest checkpoint, the tokenizer of
    its manifest) or a model folder (ssmforge export or Hugging Face Mamba, tokenizer saved beside it; the
    run config from its RUN_FILE where it has one)."""
    from ssmforge.data_pipeline.tokenizer import load_tokenizer
    from ssmforge.models import load_pretrained

    if not is_run_folder(path):
        if not Path(path).is_dir():
            raise CheckpointError(f"{path}: not found (expected a run folder or a model folder)")
        return load_pretrained(path), find_tokenizer(path), run_settings(path)
    model, config, _ = load_run_model(path)
    tok = run_tokenizer_info(config)
    if tok is None:
        return model, None, config
    file = Path(config.data.shard_dir) / tok["file"] if tok.get("file") else None
    return model, load_tokenizer(tok["kind"], file), config


def check_tokenizer(source: str | Path, model, tokenizer) -> None:
    """A model's tokenizer is there (found beside it, or given by a --tokenizer flag) and fits its vocabulary."""
    if tokenizer is None:
        raise DataError(f"{source}: no tokenizer found (no tokenizer.model or tokenizer.json in a model folder, or "
                        f"a run whose shards are remote); pass --tokenizer PATH (or --tokenizer byte)")
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary holds "
                              f"{model.config.padded_vocab_size} (model.vocab_size)")


def run_file_text(config: RunConfig, source: str) -> str:
    """RUN_FILE's contents: a header saying what reads it, then the run's resolved config without the
    RUN_FILE_DROPS sections."""
    import yaml

    settings = {k: v for k, v in yaml.safe_load(to_yaml(config)).items() if k not in RUN_FILE_DROPS}
    return RUN_FILE_HEADER.format(source=source) + yaml.safe_dump(settings, sort_keys=False)


def check_export_target(out: str | Path) -> None:
    """OUT of `export` is a new folder, an empty one or a model folder to replace; never another folder
    (a run folder, say), which the export would swap out."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; give a new folder for the export")
    names = _listing(out, "a model folder")
    if names and CONFIG_FILE not in names:
        raise CheckpointError(f"{out}: exists and is not a model folder (no {CONFIG_FILE}); give a new or empty "
                              f"folder for the export")


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Export a run's checkpoint (`tag`, default the latest) to the model folder `out`; the inputs are
    checked before torch loads."""
    check_run_folder(run_dir, tag)
    check_export_target(out)
    from ssmforge.models import save_pretrained

    model, config, tag = load_run_model(run_dir, tag)
    extra, token_ids, byte_tokenizer = {}, None, False
    tok = run_tokenizer_info(config)
    if tok is not None:
        byte_tokenizer = tok["kind"] == "byte"
        token_ids = {f"{name}_token_id": tok[f"{name}_id"] for name in ("pad", "bos", "eos")
                     if tok.get(f"{name}_id") is not None and tok[f"{name}_id"] >= 0}
        if tok.get("file"):
            extra["tokenizer.model" if tok["kind"] == "sentencepiece" else "tokenizer.json"] = \
                Path(config.data.shard_dir) / tok["file"]
    log.info("exporting %s/checkpoints/%s to %s", run_dir, tag, out)
    source = f"{Path(run_dir).resolve()}, checkpoint {tag}"
    return save_pretrained(model, out, token_ids=token_ids, extra_files=extra, byte_tokenizer=byte_tokenizer,
                           texts={RUN_FILE: run_file_text(config, source)})


def find_tokenizer(model_dir: str | Path):
    """The tokenizer saved beside a model (tokenizer.model, tokenizer.json, or the byte tokenizer that
    config.json records), or None."""
    from ssmforge.data_pipeline.tokenizer import TOKENIZER_FILES, ByteTokenizer, load_tokenizer
    from ssmforge.models.hf import BYTE_TOKENIZER_KEY

    for name, kind in zip(TOKENIZER_FILES, ("sentencepiece", "hf")):
        if (Path(model_dir) / name).is_file():
            return load_tokenizer(kind, Path(model_dir) / name)
    config = Path(model_dir) / CONFIG_FILE
    if config.is_file() and json.loads(config.read_text()).get(BYTE_TOKENIZER_KEY):
        return ByteTokenizer()
    return None
