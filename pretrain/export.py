"""`ssmforge export RUN_DIR OUT`: a checkpoint of any ZeRO stage -> one model folder
(config.json + model.safetensors, Hugging Face's format for Mamba) that models.load_pretrained reads,
with the run's tokenizer copied beside it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ssmforge.data_pipeline.loader import open_manifest
from ssmforge.data_pipeline.manifest import is_remote
from ssmforge.models import LanguageModel, load_pretrained, save_pretrained
from ssmforge.errors import CheckpointError

from .checkpoint import latest_tag
from .config import load_config

log = logging.getLogger(__name__)


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 weights of one checkpoint, gathered from ZeRO partitions where there are any."""
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


def load_run_model(run_dir: str | Path, tag: str | None = None):
    """(model, run config, tag) with the weights of a run's checkpoint (default: the latest)."""
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: not found; {run_dir} is not a run folder")
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise CheckpointError(f"{checkpoint_dir}: no checkpoint{f' named {tag}' if tag else ''} to load")
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
    if is_remote(config.data.shard_dir):
        return None
    return open_manifest(config.data.shard_dir, config.data.cache_dir).tokenizer


def load_model_and_tokenizer(path: str | Path):
    """(model, tokenizer or None, run config or None) from a run folder (latest checkpoint, the tokenizer of
    its manifest) or a model folder (ssmforge export or Hugging Face Mamba, tokenizer saved beside it)."""
    from ssmforge.data_pipeline.tokenizer import load_tokenizer

    if not is_run_folder(path):
        if not Path(path).is_dir():
            raise CheckpointError(f"{path}: not found (expected a run folder or a model folder)")
        return load_pretrained(path), find_tokenizer(path), None
    model, config, _ = load_run_model(path)
    tok = run_tokenizer_info(config)
    if tok is None:
        return model, None, config
    file = Path(config.data.shard_dir) / tok["file"] if tok.get("file") else None
    return model, load_tokenizer(tok["kind"], file), config


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
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
    return save_pretrained(model, out, token_ids=token_ids, extra_files=extra, byte_tokenizer=byte_tokenizer)


def find_tokenizer(model_dir: str | Path):
    """The tokenizer saved beside a model (tokenizer.model, tokenizer.json, or the byte tokenizer that
    config.json records), or None."""
    import json

    from ssmforge.data_pipeline.tokenizer import TOKENIZER_FILES, ByteTokenizer, load_tokenizer
    from ssmforge.models.hf import BYTE_TOKENIZER_KEY, CONFIG_FILE

    for name, kind in zip(TOKENIZER_FILES, ("sentencepiece", "hf")):
        if (Path(model_dir) / name).is_file():
            return load_tokenizer(kind, Path(model_dir) / name)
    config = Path(model_dir) / CONFIG_FILE
    if config.is_file() and json.loads(config.read_text()).get(BYTE_TOKENIZER_KEY):
        return ByteTokenizer()
    return None
