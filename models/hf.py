"""Weight interop with Hugging Face transformers' MambaForCausalLM and Mamba2ForCausalLM directories.

A model directory holds `config.json` (Hugging Face's MambaConfig or Mamba2Config fields, plus our own
ModelConfig under the key `ssmforge_model`, which transformers keeps as an ignored attribute) and
`model.safetensors`. Our config is written nested (`{"d_model": ..., "mamba": {"d_state": ...}}`); one
written before the per-mixer sections (flat keys such as `mamba2_d_state`) is converted on load.
Directories written by transformers (safetensors or pytorch_model.bin, single or sharded) load too.
Nothing is unpickled: .bin files go through torch.load(weights_only=True).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Mamba2Config, MambaConfig, ModelConfig, upgrade_flat_model_dict
from ssmforge.errors import CheckpointError, ConfigError
from .lm import LanguageModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OUR_CONFIG_KEY = "ssmforge_model"
BYTE_TOKENIZER_KEY = "ssmforge_byte_tokenizer"


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(hf: dict, key: str, kind: type, path: Path, default=None):
    """One typed field of a Hugging Face config, with the file and field named on error."""
    if key not in hf:
        if default is None:
            raise CheckpointError(f"{path}: missing field '{key}'")
        return default
    value = hf[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise CheckpointError(f"{path}: field '{key}' should be {kind.__name__}, got {value!r}")
    return value


def config_from_hf(hf: dict, path: Path) -> ModelConfig:
    """Hugging Face MambaConfig or Mamba2Config dict -> ModelConfig (our own copy wins where present)."""
    if OUR_CONFIG_KEY in hf:
        ours = hf[OUR_CONFIG_KEY]
        if not isinstance(ours, dict):
            raise CheckpointError(f"{path}: field '{OUR_CONFIG_KEY}' should be an object, got {ours!r}")
        try:
            config = ModelConfig.from_dict(upgrade_flat_model_dict(ours), prefix=OUR_CONFIG_KEY)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{path}: field '{OUR_CONFIG_KEY}': {e}") from None
        return _validated(config, path)
    model_type = hf.get("model_type")
    if model_type not in _FROM_HF:
        raise CheckpointError(f"{path}: field 'model_type' is {model_type!r}; only 'mamba' (MambaForCausalLM) and "
                              f"'mamba2' (Mamba2ForCausalLM) checkpoints can be imported")
    act = _field(hf, "hidden_act", str, path, "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: field 'hidden_act' is {act!r}; only 'silu' is supported")
    vocab = _field(hf, "vocab_size", int, path)
    stack = dict(
        d_model=_field(hf, "hidden_size", int, path),
        n_layer=_field(hf, "num_hidden_layers", int, path),
        vocab_size=vocab,
        pad_vocab_size_multiple=8 if vocab % 8 == 0 else 1,  # keep the checkpoint's embedding shape
        bias=_field(hf, "use_bias", bool, path, False),
        rms_norm_eps=_field(hf, "layer_norm_epsilon", float, path, 1e-5),
        residual_in_fp32=_field(hf, "residual_in_fp32", bool, path, True),
    )
    # the fields both transformers configs share, which both our sections have
    mixer = dict(
        d_conv=_field(hf, "conv_kernel", int, path),
        expand=_field(hf, "expand", int, path),
        dt_min=_field(hf, "time_step_min", float, path, 0.001),
        dt_max=_field(hf, "time_step_max", float, path, 0.1),
        dt_init_floor=_field(hf, "time_step_floor", float, path, 1e-4),
        conv_bias=_field(hf, "use_conv_bias", bool, path, True),
    )
    return _validated(_FROM_HF[model_type](hf, path, stack, mixer), path)


def _mamba_from_hf(hf: dict, path: Path, stack: dict, mixer: dict) -> ModelConfig:
    rank = hf.get("time_step_rank", "auto")
    if rank != "auto" and not isinstance(rank, int):
        raise CheckpointError(f"{path}: field 'time_step_rank' should be 'auto' or an int, got {rank!r}")
    section = MambaConfig(
        d_state=_field(hf, "state_size", int, path),
        dt_rank=None if rank == "auto" else rank,
        dt_scale=_field(hf, "time_step_scale", float, path, 1.0),
        **mixer,
    )
    return ModelConfig(family="mamba", tie_embeddings=_field(hf, "tie_word_embeddings", bool, path, True),
                       mamba=section, **stack)


def _mamba2_from_hf(hf: dict, path: Path, stack: dict, mixer: dict) -> ModelConfig:
    headdim = _field(hf, "head_dim", int, path)
    heads = _field(hf, "num_heads", int, path)
    if heads * headdim != mixer["expand"] * stack["d_model"]:
        raise CheckpointError(f"{path}: field 'num_heads' is {heads}; num_heads * head_dim must equal "
                              f"expand * hidden_size ({mixer['expand'] * stack['d_model']})")
    limit = hf.get("time_step_limit", [0.0, math.inf])
    if not isinstance(limit, list) or limit != [0.0, math.inf]:
        raise CheckpointError(f"{path}: field 'time_step_limit' is {limit!r}; only [0.0, inf] (no clamp) is supported")
    if not _field(hf, "rms_norm", bool, path, True):
        raise CheckpointError(f"{path}: field 'rms_norm' is false; only the gated RMSNorm variant is supported")
    section = Mamba2Config(
        d_state=_field(hf, "state_size", int, path),
        headdim=headdim,
        ngroups=_field(hf, "n_groups", int, path),
        chunk_size=_field(hf, "chunk_size", int, path, 256),
        **mixer,
    )
    return ModelConfig(family="mamba2", mamba2=section,
                       tie_embeddings=_field(hf, "tie_word_embeddings", bool, path, False),  # Mamba2Config's default
                       **stack)


_FROM_HF = {"mamba": _mamba_from_hf, "mamba2": _mamba2_from_hf}


def _validated(config: ModelConfig, path: Path) -> ModelConfig:
    try:
        return config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


HF_FAMILIES = ("mamba", "mamba2")  # families with a transformers model class of the same weights
NATIVE_MODEL_TYPE = "ssmforge"  # config.json of the other families: our ModelConfig alone


def config_to_hf(config: ModelConfig, token_ids: dict | None = None) -> dict:
    """ModelConfig -> a config.json that transformers' MambaForCausalLM or Mamba2ForCausalLM loads unchanged.
    Families without a transformers equivalent (GSS, hybrids, the Transformer baseline) get model_type
    'ssmforge': the same folder layout, loadable by `load_pretrained` only."""
    ids = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, **(token_ids or {})}
    if config.family not in HF_FAMILIES:
        return {"model_type": NATIVE_MODEL_TYPE, "vocab_size": config.padded_vocab_size, "torch_dtype": "float32",
                **ids, OUR_CONFIG_KEY: _our_config(config)}
    mixer = config.section(config.family)  # MambaConfig or Mamba2Config
    shared = {
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "expand": mixer.expand,
        "conv_kernel": mixer.d_conv,
        "time_step_min": mixer.dt_min,
        "time_step_max": mixer.dt_max,
        "time_step_floor": mixer.dt_init_floor,
        "use_bias": config.bias,
        "use_conv_bias": mixer.conv_bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": config.rms_norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.1,
        "rescale_prenorm_residual": False,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if config.family == "mamba":
        specific = {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "state_size": mixer.d_state,
            "intermediate_size": mixer.d_inner(config.d_model),
            "time_step_rank": mixer.resolved_dt_rank(config.d_model),
            "time_step_scale": mixer.dt_scale,
            "time_step_init_scheme": "random",
        }
    else:
        specific = {
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "state_size": mixer.d_state,
            "head_dim": mixer.headdim,
            "num_heads": mixer.d_inner(config.d_model) // mixer.headdim,
            "n_groups": mixer.ngroups,
            "chunk_size": mixer.chunk_size,
            "time_step_limit": [0.0, math.inf],
            "rms_norm": True,
        }
    return {**specific, **shared, **ids, OUR_CONFIG_KEY: _our_config(config)}


def _our_config(config: ModelConfig) -> dict:
    """Our ModelConfig as config.json stores it: nested sections, without kernel_backend and kernel_block_mib
    (which kernels run and how much memory they may take are choices of the machine that loads the model, not
    part of it; a loaded model starts at their defaults)."""
    ours = dataclasses.asdict(config)
    ours.pop("kernel_backend")
    ours.pop("kernel_block_mib")
    return ours


def _hf_key(ours: str) -> str:
    if ours == "lm_head.weight":
        return ours
    if ours.startswith("embedding."):
        return "backbone.embeddings." + ours[len("embedding."):]
    return "backbone." + ours


def _load_weight_files(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a directory (single or sharded, safetensors or .bin) and the name they came from."""
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index_path = directory / index_name
        if index_path.exists():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: missing field 'weight_map'")
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(loader(directory / shard))
            return tensors, index_name
    for name, loader in ((WEIGHTS_FILE, _load_safetensors), ("pytorch_model.bin", _load_bin)):
        if (directory / name).exists():
            return loader(directory / name), name
    raise CheckpointError(f"{directory}: no weights found (expected {WEIGHTS_FILE} or pytorch_model.bin)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"{path}: not a loadable weights-only PyTorch file ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> LanguageModel:
    """Load a model directory (ours, or transformers' MambaForCausalLM or Mamba2ForCausalLM) into a LanguageModel.

    The returned model maps input_ids (batch, L) to logits (batch, L, vocab). dtype None keeps the
    float32 construction dtype; the SSM parameters (A_log, D, dt bias) always stay float32.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a model folder with {CONFIG_FILE})")
    config_path = directory / CONFIG_FILE
    config = config_from_hf(_read_json(config_path), config_path)
    tensors, source = _load_weight_files(directory)
    model = LanguageModel(config)
    expected = {name: p for name, p in model.state_dict().items()
                if not (config.tie_embeddings and name == "lm_head.weight")}
    hf_names = {_hf_key(name): name for name in expected}
    state = {}
    for key, tensor in tensors.items():
        if key in hf_names:
            state[hf_names[key]] = tensor
        elif key in expected:
            state[key] = tensor
        elif key == "lm_head.weight" and config.tie_embeddings:
            continue  # a tied head saved anyway
        else:
            raise CheckpointError(f"{directory / source}: unexpected tensor '{key}' for this config")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{directory / source}: missing tensor '{_hf_key(missing[0])}'"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{directory / source}: tensor '{_hf_key(name)}' has shape "
                                  f"{tuple(tensor.shape)} but {CONFIG_FILE} implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)
    return cast_model(model, dtype).to(device)


def cast_model(model: LanguageModel, dtype: torch.dtype | None) -> LanguageModel:
    """Cast to `dtype` except the parameters marked to stay float32."""
    if dtype is None:
        return model
    for param in model.parameters():
        if not getattr(param, "_ssmforge_fp32", False):
            param.data = param.data.to(dtype)
    return model


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pretrained(model: LanguageModel, out_dir: str | os.PathLike, token_ids: dict | None = None,
                    extra_files: dict[str, Path] | None = None, byte_tokenizer: bool = False,
                    texts: dict[str, str] | None = None) -> Path:
    """Write `model` as a transformers-loadable MambaForCausalLM or Mamba2ForCausalLM directory, atomically.

    extra_files maps names in the output directory to files copied in (a tokenizer, say); texts maps
    names to text written there (an export's run settings); byte_tokenizer records that the model reads
    UTF-8 bytes (a tokenizer with no file). The folder and its files get the modes the umask gives new
    folders and files (0755 / 0644 under umask 022), like every other file a run writes, although they
    are staged in a private temporary folder first.
    """
    out = Path(out_dir)
    config = config_to_hf(model.config, token_ids)
    if byte_tokenizer:
        config[BYTE_TOKENIZER_KEY] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {_hf_key(name): t.detach().to("cpu").contiguous()
                   for name, t in model.state_dict().items()
                   if not (model.config.tie_embeddings and name == "lm_head.weight")}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=2)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        # mkdtemp makes 0700 and safetensors writes 0600: give them what an ordinary file would have
        mask = _umask()
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if out.exists():  # swap in the new directory, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
