"""SAE files: read the formats people publish, write mechscope's own (a directory SAELens also loads).

Every reader returns ``(SAEConfig, tensors)``, the tensors keyed as :class:`~mechscope.sae.model.SparseAutoencoder`'s
parameters (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and ``threshold`` for JumpReLU and BatchTopK), and the writer
takes the same pair; this module never builds an SAE (``SparseAutoencoder.from_tensors`` does, and
:mod:`mechscope.sae.io` has the loaders that return one).

- mechscope / SAELens (``read_saelens``, ``write_saelens``): ``cfg.json`` + ``sae_weights.safetensors`` (W_enc,
  b_enc, W_dec, b_dec, and threshold for JumpReLU).
- EleutherAI sparsify (``read_sparsify``): ``cfg.json`` + ``sae.safetensors`` (encoder.weight, encoder.bias, W_dec,
  b_dec).
- Gemma Scope (``read_gemma_scope``): ``params.npz`` (W_enc, W_dec, b_enc, b_dec, threshold).
- OpenAI sparse_autoencoder / Transformer Debugger (``read_openai``): a ``torch.save``d state dict (.pt).

``docs/sae.md`` has the full table of keys and shapes.

Only safe readers are used: safetensors, JSON, ``np.load(allow_pickle=False)`` and ``torch.load(weights_only=True)``.
Every problem raises ``SAEFormatError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechscope._version import __version__
from mechscope.files import atomic_write
from mechscope.models.names import block_hook, module_hook
from mechscope.sae.config import NORMALIZATIONS, SAEConfig, dtype_name

CFG_FILE = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"

# SAELens reads cfg.json's metadata.sae_lens_version to pick its parser; 6.0.0 is the layout mechscope writes.
SAELENS_LAYOUT_VERSION = "6.0.0"
_SAELENS_ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_WEIGHTS_METADATA = {"format": "pt"}
_OPENAI_STATS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")
_KNOWN_FORMATS = (
    f"a directory with {CFG_FILE} + {SAELENS_WEIGHTS} (mechscope / SAELens), {CFG_FILE} + {SPARSIFY_WEIGHTS} "
    f"(EleutherAI sparsify) or {GEMMA_SCOPE_PARAMS} (Gemma Scope); or a file: {GEMMA_SCOPE_PARAMS} or a torch "
    "state dict (.pt, OpenAI sparse_autoencoder / Transformer Debugger)"
)


# What a format reader returns and the writer takes: the config and the tensors named as the SAE's parameters.
SAETensors = tuple[SAEConfig, dict[str, Tensor]]

# How a file is written: ``write_file(path, write)`` has ``write(tmp)`` write it, and puts it in place at ``path``.
WriteFile = Callable[[Path, Callable[[Path], object]], object]


#: the fix every "truncated or damaged file" error ends with
REFETCH = ": download, copy or save the SAE again (or pass another path)"


class SAEFormatError(ValueError):
    """A path that holds no loadable SAE: the message names the file and what is wrong with it."""


# ---- detecting and dispatching --------------------------------------------------------------------------------


def detect_format(path: str | Path) -> str:
    """``"saelens"``, ``"sparsify"``, ``"gemma_scope"`` or ``"openai"``: the format of the SAE at ``path``.

    ``path`` is an SAE directory, a file in one, a ``params.npz`` or a torch state dict file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        for name, fmt in (
            (SAELENS_WEIGHTS, "saelens"),
            (SPARSIFY_WEIGHTS, "sparsify"),
            (GEMMA_SCOPE_PARAMS, "gemma_scope"),
        ):
            if (path / name).is_file():
                return fmt
        found = sorted(p.name for p in path.iterdir())[:12]
        raise SAEFormatError(f"{path} holds no SAE (found {found}); expected {_KNOWN_FORMATS}")
    if path.name in (CFG_FILE, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
        return detect_format(path.parent)
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as e:
            raise SAEFormatError(f"{path} is a truncated or corrupt zip archive ({e}){REFETCH}") from e
        if names and all(name.endswith(".npy") for name in names):
            return "gemma_scope"
        if any(name.endswith("data.pkl") for name in names):
            return "openai"
        raise SAEFormatError(f"{path} is a zip archive of {names[:5]}, neither an npz nor a torch file")
    if head[:1] == b"\x80":  # a pickle protocol marker: torch.save's legacy (pre-zip) format
        return "openai"
    raise SAEFormatError(f"{path} is not an SAE file (it starts with {head!r}); expected {_KNOWN_FORMATS}")


def read_sae(path: str | Path) -> SAETensors:
    """``(config, tensors)`` of the SAE at ``path``, in whichever format it is (``detect_format``).

    ``path`` is an SAE directory, a file in one, a ``params.npz`` or a torch state dict file.
    """
    fmt = detect_format(path)
    path = Path(path)
    location = path.parent if path.is_file() and path.name in (CFG_FILE, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS) else path
    readers: dict[str, Callable[[Path], SAETensors]] = {
        "saelens": read_saelens,
        "sparsify": read_sparsify,
        "gemma_scope": read_gemma_scope,
        "openai": read_openai,
    }
    return readers[fmt](location)


# ---- shared readers and checks --------------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SAEFormatError(f"{file} is missing: an SAE directory needs its {file.name} beside the weights") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{file} is not valid JSON, perhaps truncated ({e}){REFETCH}") from e
    if not isinstance(data, dict):
        raise SAEFormatError(f"{file} holds a JSON {type(data).__name__}, not an object of config fields")
    return data


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise SAEFormatError(f"{file} is missing: the SAE directory has its config but no weights")
    try:
        return load_file(file)
    except SafetensorError as e:
        raise SAEFormatError(f"{file} is truncated or not a safetensors file ({e}){REFETCH}") from e


def _field(raw: dict[str, Any], name: str, source: Path) -> Any:
    if name not in raw:
        raise SAEFormatError(f"{source} has no {name!r} field (fields: {sorted(raw)})")
    return raw[name]


def _make_config(source: Path | str, **fields: Any) -> SAEConfig:
    try:
        return SAEConfig(**fields)
    except ValueError as e:
        raise SAEFormatError(f"{source}: {e}") from e


def _check_tensors(
    source: Path | str,
    tensors: dict[str, Any],
    expected: dict[str, tuple[int, ...]],
    why: str,
    optional: dict[str, tuple[int, ...]] | None = None,
) -> None:
    """Raise an SAEFormatError unless ``tensors`` holds exactly ``expected`` (plus any of ``optional``), shaped so,
    with finite values in the ``expected`` ones.

    ``why`` says where the expected shapes come from (e.g. ``"cfg.json gives d_in=64, d_sae=256"``).
    """
    optional = optional or {}
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise SAEFormatError(f"{source}: missing {missing} (found {sorted(tensors)})")
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    if unexpected:
        raise SAEFormatError(f"{source}: unexpected entries {unexpected}; expected {sorted(expected)}")
    for name, shape in {**expected, **optional}.items():
        if name not in tensors:
            continue
        value = tensors[name]
        if not isinstance(value, Tensor):
            raise SAEFormatError(
                f"{source}: {name} is a {type(value).__name__}, expected a tensor of shape {list(shape)}"
            )
        if tuple(value.shape) != shape:
            raise SAEFormatError(f"{source}: {name} has shape {list(value.shape)}, expected {list(shape)} ({why})")
        if name in expected and not value.is_floating_point():  # the optional OpenAI statistics may be counts
            raise SAEFormatError(
                f"{source}: {name} has dtype {value.dtype}, not a floating-point one: an SAE's tensors are "
                "float32/float64/float16/bfloat16; the file is damaged or not an SAE's (save or download it again)"
            )
        if name in expected and not torch.isfinite(value).all():
            bad = value.numel() - int(torch.isfinite(value).sum())
            raise SAEFormatError(
                f"{source}: {name} holds {bad} NaN or infinite values of {value.numel()}; the SAE is damaged "
                "(a diverged training run or a broken conversion): retrain it or load another copy"
            )


def _sae_shapes(d_in: int, d_sae: int, architecture: str) -> dict[str, tuple[int, ...]]:
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (d_sae,)
    return shapes


# ---- mechscope / SAELens --------------------------------------------------------------------------------------


def read_saelens(path: str | Path) -> SAETensors:
    """Read a mechscope / SAELens directory: ``cfg.json`` + ``sae_weights.safetensors``.

    Reads SAELens 6 configs (``model_name`` / ``hook_name`` / ``neuronpedia_id`` under ``metadata``) and older flat ones
    (``hook_point``, ``activation_fn_str="topk"``). Architectures ``standard`` (-> relu), ``topk`` and ``jumprelu``;
    a ``jumprelu`` whose ``metadata.training_architecture`` is ``batchtopk`` (as SAELens and mechscope save
    BatchTopK SAEs) comes back as ``batchtopk``. A TopK SAE with
    ``rescale_acts_by_decoder_norm`` is read with its decoder norms folded into the encoder (same outputs).
    """
    path = Path(path)
    cfg_file, weights_file = path / CFG_FILE, path / SAELENS_WEIGHTS
    cfg, rescale_by_decoder_norm = _saelens_config(_read_json(cfg_file), cfg_file)
    tensors = _read_safetensors(weights_file)
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise SAEFormatError(f"{weights_file}: a finetuning scaling_factor other than 1 is not supported")
    why = f"{cfg_file.name} gives d_in={cfg.d_in}, d_sae={cfg.d_sae}, architecture {cfg.architecture!r}"
    _check_tensors(weights_file, tensors, _sae_shapes(cfg.d_in, cfg.d_sae, cfg.architecture), why)
    if rescale_by_decoder_norm:
        norms = tensors["W_dec"].norm(dim=-1)
        tensors.update(
            W_enc=tensors["W_enc"] * norms, b_enc=tensors["b_enc"] * norms, W_dec=tensors["W_dec"] / norms[:, None]
        )
    return cfg, tensors


def _saelens_config(raw: dict[str, Any], source: Path) -> tuple[SAEConfig, bool]:
    """The SAEConfig a SAELens cfg.json describes, and whether its TopK rescales by decoder norms."""
    metadata = raw.get("metadata") or {}

    def provenance(name: str, old_name: str) -> str | None:
        return metadata.get(name, raw.get(name, raw.get(old_name)))

    architecture = raw.get("architecture", "standard")
    activation = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
    k = raw.get("k")
    if architecture == "standard" and activation == "topk":  # SAELens < 6 wrote TopK SAEs this way
        architecture, k = "topk", (raw.get("activation_fn_kwargs") or {}).get("k")
    if architecture not in _SAELENS_ARCHITECTURES or (architecture == "standard" and activation != "relu"):
        raise SAEFormatError(
            f"{source}: SAELens architecture {architecture!r} (activation {activation!r}) is not supported; "
            f"mechscope loads {sorted(_SAELENS_ARCHITECTURES)} with ReLU"
        )
    ours = _SAELENS_ARCHITECTURES[architecture]
    if ours == "jumprelu" and metadata.get("training_architecture") == "batchtopk":  # SAELens's own record
        ours, k = "batchtopk", (metadata.get("training_architecture_details") or {}).get("k")
    elif ours == "jumprelu":
        k = None
    normalize = raw.get("normalize_activations", "none")
    normalize = {None: "none", False: "none", True: "expected_average_only_in"}.get(normalize, normalize)
    if normalize == "expected_average_only_in":
        warnings.warn(
            f"{source}: normalize_activations='expected_average_only_in' but the file stores no scaling factor; "
            "loading without input scaling, as SAELens's load_from_disk does. If you know the factor, set "
            "sae.cfg = dataclasses.replace(sae.cfg, normalize_activations='expected_average_only_in', "
            "scaling_factor=...)",
            stacklevel=3,
        )
        normalize = "none"
    if normalize not in NORMALIZATIONS:
        raise SAEFormatError(f"{source}: normalize_activations={normalize!r} is not supported ({NORMALIZATIONS})")
    cfg = _make_config(
        source,
        d_in=_field(raw, "d_in", source),
        d_sae=_field(raw, "d_sae", source),
        architecture=ours,
        k=k,
        model_name=provenance("model_name", "model_name"),
        hook_name=provenance("hook_name", "hook_point"),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        dtype=raw.get("dtype", "float32"),
        neuronpedia_id=provenance("neuronpedia_id", "neuronpedia_id") or None,
    )
    return cfg, ours == "topk" and bool(raw.get("rescale_acts_by_decoder_norm", False))


def write_saelens(
    cfg: SAEConfig,
    tensors: dict[str, Tensor],
    path: str | Path,
    *,
    overwrite: bool = False,
    write_file: WriteFile = atomic_write,
) -> Path:
    """Write the SAE ``(cfg, tensors)`` to the directory ``path`` as ``cfg.json`` + ``sae_weights.safetensors``;
    returns ``path``.

    The layout is SAELens 6's, so ``sae_lens.SAE.load_from_disk(path)`` loads it: relu is saved as ``standard``,
    batchtopk as ``jumprelu`` (its inference form) with ``metadata.training_architecture="batchtopk"`` and
    ``training_architecture_details={"k": k}``, as SAELens does, and a fixed ``scaling_factor`` is folded into the
    weights (``normalize_activations`` becomes ``"none"``; outputs are unchanged). Saving over a directory holding
    a different SAE needs ``overwrite=True``; saving the same SAE again is a no-op. Each file is written by
    ``write_file(target, write)`` (:func:`mechscope.files.atomic_write`: a temporary file beside the target, then
    renamed), the config once the weights are written in full and the weights right after it, so a failure leaves
    no half-written file and no new config beside old weights. A test passes another ``write_file`` to make a write
    fail.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; an SAE is saved as a directory: choose another path")
    cfg_dict, tensors = _saelens_layout(cfg, tensors)
    cfg_text = json.dumps(cfg_dict, indent=2) + "\n"
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    cfg_file, weights_file = path / CFG_FILE, path / SAELENS_WEIGHTS
    if _holds(cfg_file, weights_file, cfg_text, tensors):
        return path
    if (cfg_file.exists() or weights_file.exists()) and not overwrite:
        raise FileExistsError(
            f"{path} already holds a different SAE ({_describe(cfg_file)}): "
            "pass overwrite=True to replace it, or save elsewhere"
        )
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)

    def write_weights(tmp: Path) -> None:
        save_file(tensors, tmp, metadata=_WEIGHTS_METADATA)
        write_file(cfg_file, lambda cfg_tmp: cfg_tmp.write_text(cfg_text, encoding="utf-8"))

    try:
        write_file(weights_file, write_weights)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # only if nothing else was put there meanwhile
                path.rmdir()
        raise
    return path


def _holds(cfg_file: Path, weights_file: Path, cfg_text: str, tensors: dict[str, Tensor]) -> bool:
    """Whether ``cfg_file`` holds ``cfg_text`` and ``weights_file`` exactly ``tensors`` (names, dtypes, shapes and
    bytes; read one tensor at a time)."""
    try:
        if cfg_file.read_text(encoding="utf-8") != cfg_text:
            return False
        with safe_open(weights_file, framework="pt") as stored:
            if stored.metadata() != _WEIGHTS_METADATA or set(stored.keys()) != set(tensors):
                return False
            return all(_same_bytes(stored.get_tensor(name), value) for name, value in tensors.items())
    except (OSError, ValueError, SafetensorError):
        return False


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8))


def _describe(cfg_file: Path) -> str:
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        return f"architecture {raw.get('architecture')!r}, d_in={raw.get('d_in')}, d_sae={raw.get('d_sae')}"
    except (OSError, ValueError, AttributeError):
        return f"its {cfg_file.name} is unreadable"


def _saelens_layout(cfg: SAEConfig, tensors: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(cfg.json dict, tensors)`` of the SAE ``(cfg, tensors)`` in SAELens 6's layout."""
    tensors = {name: value.detach().contiguous() for name, value in tensors.items()}
    normalize = cfg.normalize_activations
    if normalize == "expected_average_only_in":  # fold x * s in, out / s: (x*s - b) @ W = (x - b/s) @ (s W)
        s = cfg.scaling_factor
        assert s is not None  # SAEConfig requires it for this normalisation
        tensors.update(W_enc=tensors["W_enc"] * s, W_dec=tensors["W_dec"] / s, b_dec=tensors["b_dec"] / s)
        normalize = "none"
    architecture = {"relu": "standard", "batchtopk": "jumprelu"}.get(cfg.architecture, cfg.architecture)
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "mechscope_version": __version__,
    }
    if cfg.neuronpedia_id is not None:
        metadata["neuronpedia_id"] = cfg.neuronpedia_id
    if cfg.architecture == "batchtopk":
        metadata.update(training_architecture="batchtopk", training_architecture_details={"k": cfg.k})
    cfg_dict: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": normalize,
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if cfg.architecture == "topk":
        cfg_dict.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    return cfg_dict, tensors


# ---- EleutherAI sparsify --------------------------------------------------------------------------------------


def read_sparsify(path: str | Path) -> SAETensors:
    """Read an EleutherAI sparsify SAE directory: ``cfg.json`` + ``sae.safetensors`` (a TopK SAE).

    Keys ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``; latents are the
    top ``k`` of ``relu(encoder(x - b_dec))``. The directory's name is sparsify's hookpoint (a module path such as
    ``layers.6``), which becomes the hook name ``layers.6.hook_result_post``; ``model_name`` comes from the run's
    ``config.json`` one level up when present. Transcoders, skip connections and groupmax are refused.
    """
    path = Path(path)
    cfg_file, weights_file = path / CFG_FILE, path / SPARSIFY_WEIGHTS
    raw = _read_json(cfg_file)
    if raw.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{cfg_file}: sparsify activation {raw['activation']!r} is not supported (only topk)")
    for flag in ("transcode", "skip_connection", "signed", "embed_skip", "gram_lookup"):
        if raw.get(flag):
            raise SAEFormatError(f"{cfg_file}: sparsify coders with {flag}=true are not supported")
    d_in = _field(raw, "d_in", cfg_file)
    d_sae = raw.get("num_latents") or d_in * _field(raw, "expansion_factor", cfg_file)
    tensors = _read_safetensors(weights_file)
    why = f"{cfg_file.name} gives d_in={d_in}, {d_sae} latents"
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    _check_tensors(weights_file, tensors, expected, why)
    hookpoint = path.resolve().name
    cfg = _make_config(
        cfg_file,
        d_in=d_in,
        d_sae=d_sae,
        architecture="topk",
        k=_field(raw, "k", cfg_file),
        model_name=_sparsify_model_name(path.resolve().parent / "config.json"),
        hook_name=module_hook(hookpoint, "post")
        if re.fullmatch(r"(layers\.\d+|embed_tokens)(\.\w+)*", hookpoint)
        else None,
        dtype=dtype_name(tensors["W_dec"].dtype),
    )
    return cfg, {
        "W_enc": tensors["encoder.weight"].T,
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }


def _sparsify_model_name(run_config: Path) -> str | None:
    try:
        model = json.loads(run_config.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


# ---- Gemma Scope ----------------------------------------------------------------------------------------------


def read_gemma_scope(path: str | Path, *, model_name: str | None = None, hook_name: str | None = None) -> SAETensors:
    """Read a Gemma Scope ``params.npz`` (or its directory): a JumpReLU SAE that does not subtract ``b_dec``.

    Arrays ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``; latents are
    ``relu(pre) * (pre > threshold)`` with ``pre = x @ W_enc + b_enc``. Without ``model_name`` / ``hook_name`` they
    are read from a Hugging Face path such as ``.../gemma-scope-2b-pt-res/.../layer_20/width_16k/...`` when present.
    """
    path = Path(path)
    file = path / GEMMA_SCOPE_PARAMS if path.is_dir() else path
    canonical = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {canonical.get(name.lower(), name): torch.from_numpy(npz[name]) for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SAEFormatError(f"{file} is truncated or not a plain npz archive of arrays ({e}){REFETCH}") from e
    w_enc = arrays.get("W_enc")
    if w_enc is None or w_enc.ndim != 2:
        raise SAEFormatError(f"{file}: needs a 2-d W_enc [d_in, d_sae] (found {sorted(arrays)})")
    d_in, d_sae = w_enc.shape
    _check_tensors(file, arrays, _sae_shapes(d_in, d_sae, "jumprelu"), f"W_enc gives d_in={d_in}, d_sae={d_sae}")
    site = _gemma_scope_site(str(path.resolve()))
    cfg = _make_config(
        file,
        d_in=d_in,
        d_sae=d_sae,
        architecture="jumprelu",
        model_name=model_name or site[0],
        hook_name=hook_name or site[1],
        apply_b_dec_to_input=False,
        dtype=dtype_name(w_enc.dtype),
    )
    return cfg, arrays


def _gemma_scope_site(path: str) -> tuple[str | None, str | None]:
    """``(model_name, hook_name)`` from a Gemma Scope path (``gemma-scope-2b-pt-res ... layer_20``), else Nones."""
    release = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)", path)
    layer = re.search(r"layer_(\d+)", path)
    if release is None or layer is None:
        return None, None
    size, variant, site = release.groups()
    model = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    hook = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}[site]
    return model, block_hook(int(layer.group(1)), hook)


# ---- OpenAI sparse_autoencoder / Transformer Debugger ---------------------------------------------------------


def read_openai(path: str | Path, *, layer_norm: bool | None = None) -> SAETensors:
    """Read an OpenAI sparse_autoencoder / Transformer Debugger state dict file with ``torch.load(weights_only=True)``.

    See ``read_openai_state_dict`` for the layout and ``layer_norm``.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SAEFormatError(
            f"{path} holds objects other than tensors and plain values; mechscope never unpickles those "
            f"(torch.load weights_only=True refused: {str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SAEFormatError(
            f"{path} is truncated or not a torch state dict ({str(e).splitlines()[0]}){REFETCH}"
        ) from e
    return read_openai_state_dict(state, source=path, layer_norm=layer_norm)


def read_openai_state_dict(
    state: dict[str, Any], source: str | Path = "state dict", layer_norm: bool | None = None
) -> SAETensors:
    """``(config, tensors)`` of an OpenAI ``Autoencoder.state_dict()``.

    Layout: ``encoder.weight [d_sae, d_in]``, ``decoder.weight [d_in, d_sae]`` (``decoder.linear.weight``, the
    encoder's, when tied), ``pre_bias [d_in]``, ``latent_bias [d_sae]``, ``activation`` (``"ReLU"`` or ``"TopK"``),
    ``activation_state_dict`` (``{"k": k, "postact_fn": "ReLU"}`` for TopK), and optional ``[d_sae]`` statistics
    buffers (read and dropped). Latents are ``activation((x - pre_bias) @ encoder.weight.T + latent_bias)``, the
    reconstruction ``latents @ decoder.weight.T + pre_bias``. ``layer_norm`` (default: True exactly for TopK, as
    ``Autoencoder.from_state_dict`` decides) normalises each token first and scales the reconstruction back.
    """
    if not isinstance(state, dict):
        raise SAEFormatError(f"{source} holds a {type(state).__name__}, not a state dict")
    state = dict(state)
    activation = state.pop("activation", "ReLU")
    activation_state = state.pop("activation_state_dict", {}) or {}
    if activation == "ReLU":
        architecture, k = "relu", None
    elif activation == "TopK":
        if activation_state.get("postact_fn", "ReLU") != "ReLU":
            raise SAEFormatError(f"{source}: TopK with postact_fn {activation_state['postact_fn']!r} is not supported")
        if "k" not in activation_state:
            raise SAEFormatError(f"{source}: activation 'TopK' without activation_state_dict['k']")
        architecture, k = "topk", int(activation_state["k"])
    else:
        raise SAEFormatError(f"{source}: activation {activation!r} is not supported (ReLU or TopK)")
    if "decoder.linear.weight" in state:  # tied decoder: TiedTranspose(encoder)
        state["decoder.weight"] = state.pop("decoder.linear.weight").T
    encoder = state.get("encoder.weight")
    if not isinstance(encoder, Tensor) or encoder.ndim != 2:
        raise SAEFormatError(f"{source}: needs a 2-d encoder.weight [d_sae, d_in] (found {sorted(state)})")
    d_sae, d_in = encoder.shape
    expected = {
        "encoder.weight": (d_sae, d_in),
        "decoder.weight": (d_in, d_sae),
        "pre_bias": (d_in,),
        "latent_bias": (d_sae,),
    }
    why = f"encoder.weight gives d_sae={d_sae}, d_in={d_in}"
    _check_tensors(source, state, expected, why, optional=dict.fromkeys(_OPENAI_STATS, (d_sae,)))
    cfg = _make_config(
        source,
        d_in=d_in,
        d_sae=d_sae,
        architecture=architecture,
        k=k,
        normalize_activations="layer_norm" if (activation == "TopK" if layer_norm is None else layer_norm) else "none",
        dtype=dtype_name(encoder.dtype),
    )
    tensors = {
        "W_enc": encoder.T,
        "b_enc": state["latent_bias"],
        "W_dec": state["decoder.weight"].T,
        "b_dec": state["pre_bias"],
    }
    return cfg, tensors
