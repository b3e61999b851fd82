"""Loading and saving weights safely: public ``.pth`` layouts, our ``.safetensors``, the bundled model.

Nothing here unpickles arbitrary objects. ``.pth`` files are read with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers; a file that needs more (e.g. a training
checkpoint holding an ``argparse.Namespace``) is refused with the command that converts it once,
explicitly trusted, into a weights-only safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .build import build_model, infer_config
from .errors import CheckpointError, FastSAM3DInputError
from .modeling import ImageEncoderViT3D, Sam3D

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
BUNDLED_MODEL_NAME = "fastsam3d-bundled.safetensors"
_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_ENCODER_ONLY_KEYS = ("patch_embed.proj.weight", "pos_embed")
_CONVERT_HINT = "fastsam3d convert-checkpoint IN OUT --trust"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else as torch understands it."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device (expected auto, cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def check_device_option(device: str) -> torch.device:
    """:func:`resolve_device` for a command line's ``--device``: a device that cannot be used here
    is bad input naming the option (exit 2), not an internal fault."""
    try:
        return resolve_device(device)
    except (ValueError, RuntimeError) as error:
        raise FastSAM3DInputError(f"--device {device}: {error}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_checksum_file(path: Path) -> Optional[str]:
    """The hex digest recorded in ``<file>.sha256`` (``sha256sum`` format), or None if absent."""
    checksum = _checksum_path(path)
    if not checksum.exists():
        return None
    text = checksum.read_text().strip().split()
    if not text or not re.fullmatch(r"[0-9a-f]{64}", text[0]):
        raise CheckpointError(f"{checksum}: expected a sha256 hex digest as its first word")
    return text[0]


def verify_checksum(path: Path, expected: str) -> str:
    """Raise CheckpointError unless the file's sha256 is ``expected``; return the digest."""
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 is {actual}, expected {expected}; the file is corrupt, truncated or not the "
            "published one — download it again"
        )
    return actual


def bundled_model_path() -> Optional[Path]:
    """The bundled weights (``Resources/Models``), or None if this install has none."""
    override = os.environ.get("FASTSAM3D_BUNDLED_MODEL")
    path = Path(override) if override else MODELS_DIR / BUNDLED_MODEL_NAME
    return path if path.exists() else None


def _with_safetensors(path: Path, read: Callable[[Any], Any]) -> Any:
    """``read(handle)`` on the opened file; a file safetensors cannot read raises CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return read(handle)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from error


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    return _with_safetensors(path, lambda handle: ({key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})))


def read_model_card(path: str | os.PathLike) -> Dict[str, Any]:
    """The model card our exports carry in their safetensors metadata ({} for other files).

    Reads only the file's header. Raises CheckpointError for a safetensors file whose header or
    card cannot be read.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    text = _with_safetensors(path, lambda handle: (handle.metadata() or {}).get("model_card"))
    if text is None:
        return {}
    try:
        card = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{path}: metadata field 'model_card' is not JSON: {error}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{path}: metadata field 'model_card' is not a JSON object")
    return card


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([^\s]+)", message)
        if found:
            what = f" (it contains {found.group(1)})"
            raise CheckpointError(
                f"{path}: refused — the file holds Python objects besides weights{what}, and loading it would "
                f"run code from the file. If you trust its source, convert it once with `{_CONVERT_HINT}` "
                "and load the .safetensors file it writes."
            ) from None
        detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated/corrupt ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError, TypeError, OverflowError, struct.error) as error:
        # Garbage bytes reach the weights-only unpickler's opcode loop, which fails in these ways
        # (e.g. IndexError on an empty stack for about 6 % of random 4 KiB files).
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (.pth/.pt) nor a safetensors file, or a truncated/corrupt one "
            f"(reading it stopped with {type(error).__name__}: {error})"
        ) from None


def _extract_state_dict(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a dict of weights (or one under 'model_state_dict'); found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path}: no weights found; top-level keys are {', '.join(map(str, list(obj)[:10]))} "
            f"(expected tensors, or a dict under one of {', '.join(_STATE_DICT_KEYS)})"
        )
    state = {}
    for key, value in tensors.items():
        for prefix in _STRIPPED_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def read_state_dict(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Weights and metadata from any supported file, without unpickling arbitrary objects.

    Returns:
      the state dict (prefixes like ``module.`` removed) and the file's metadata (safetensors only).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; expected a .pth/.pt or .safetensors checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    with open(path, "rb") as handle:
        head = handle.read(9)
    # safetensors files start with an 8-byte little-endian header length and the JSON header.
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 27)
    if path.suffix == ".safetensors" or looks_safetensors:
        state, metadata = _read_safetensors(path)
        return _extract_state_dict(state, path), metadata
    payload = _read_torch(path)
    # Our training checkpoints (FastSAM3DLib.train) carry the architecture as a JSON string.
    config = payload.get("model_config") if isinstance(payload, Mapping) else None
    return _extract_state_dict(payload, path), {"config": config} if isinstance(config, str) else {}


def _is_encoder_only(state: Mapping[str, torch.Tensor]) -> bool:
    return all(key in state for key in _ENCODER_ONLY_KEYS) and not any(k.startswith("image_encoder.") for k in state)


def _mismatch_report(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> Optional[str]:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if not (missing or unexpected or wrong_shape):
        return None

    def listing(title: str, items: list) -> str:
        shown = "\n    ".join(items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    message = f"{path}: the weights do not match the model architecture."
    if missing:
        message += listing("missing keys", missing)
    if unexpected:
        message += listing("unexpected keys", unexpected)
    if wrong_shape:
        message += listing("wrong shapes", wrong_shape)
    if any(re.search(r"blocks\.\d+\.(norm1|attn)\.", key) for key in missing + unexpected):
        message += (
            "\n  hint: the public FastSAM3D student has no attention in blocks 0 and 1 (its code's "
            "skip_layer=2); a checkpoint written by code built with skip_layer=0 has attention weights there, "
            "and the other way round. Let load_model infer the architecture from the file (no config override)."
        )
    return message


def load_state_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Strictly load ``state`` into ``model``, or raise CheckpointError listing every mismatch."""
    report = _mismatch_report(model, state, path)
    if report:
        raise CheckpointError(report)
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{path}: {len(bad)} weight tensors hold NaN or infinite values ({shown}); the file is corrupt or "
            "comes from a training run that diverged"
        )
    model.load_state_dict(state, strict=True)


def _config_from_metadata(metadata: Mapping[str, str], path: Path) -> Optional[Dict[str, Any]]:
    if "config" not in metadata:
        return None
    try:
        return json.loads(metadata["config"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: metadata field 'config' is not JSON: {error}") from None


def _build_checked(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: Path, encoder_only: bool = False):
    """Build the model ``cfg`` describes, but only once it is known to fit the weights in ``state``.

    ``cfg`` partly comes from the file's own metadata, which could claim any size (a 100000-wide
    encoder, a million blocks): it is first built on the meta device, which allocates nothing, and
    compared with the weights' keys and shapes.
    """
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", key))}
    kinds = cfg.get("block_kinds")
    if not isinstance(kinds, (list, tuple)) or len(kinds) != len(blocks):
        count = len(kinds) if isinstance(kinds, (list, tuple)) else repr(kinds)
        raise CheckpointError(
            f"{path}: the architecture in the file's metadata has {count} encoder blocks, its weights {len(blocks)}"
        )
    try:
        with torch.device("meta"):
            skeleton = build_model(cfg)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError, RuntimeError, OverflowError) as error:
        raise CheckpointError(f"{path}: unsupported architecture (from its weights and metadata): {error}") from None
    if encoder_only:
        prefix = "image_encoder."
        report = _mismatch_report(skeleton.image_encoder, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, path)
    else:
        report = _mismatch_report(skeleton, state, path)
    if report:
        raise CheckpointError(report)
    return build_model(cfg)


def load_model(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    *,
    decoder_path: str | os.PathLike | None = None,
    config: Optional[Mapping[str, Any]] = None,
) -> Sam3D:
    """Load a model from a checkpoint, inferring its architecture from the weights.

    Arguments:
      path: a public FastSAM3D / SAM-Med3D checkpoint (``model_state_dict``, bare state dict, or a
        training checkpoint with optimizer state), our ``.safetensors``, or an encoder-only student
        checkpoint (then ``decoder_path`` gives the prompt encoder and mask decoder). None loads the
        bundled model, verifying its sha256.
      device: "auto", "cpu", "cuda", ...
      decoder_path: a full checkpoint whose prompt encoder and mask decoder complete an
        encoder-only checkpoint.
      config: architecture overrides (see :mod:`FastSAM3DLib.build`); normally unnecessary.

    Returns:
      the model in eval mode on ``device``, with ``model.config["source"]`` and ``["sha256"]`` set.

    Raises:
      CheckpointError: missing, unreadable, unsafe, or mismatching file (the message says which
        and what was expected).
    """
    if path is None:
        bundled = bundled_model_path()
        if bundled is None:
            raise CheckpointError(
                f"no bundled model weights in this install (looked for {MODELS_DIR / BUNDLED_MODEL_NAME}). "
                "Pass a checkpoint instead: load_model('FastSAM3D.pth') in Python, or "
                "`fastsam3d segment IMAGE --model PATH ...` on the command line."
            )
        expected = read_checksum_file(bundled)
        if expected is None:
            raise CheckpointError(f"{bundled}: its checksum file {_checksum_path(bundled).name} is missing")
        digest = verify_checksum(bundled, expected)
        path = bundled
    else:
        path = Path(path)
        expected = read_checksum_file(path) if path.exists() else None
        digest = verify_checksum(path, expected) if expected else None
    path = Path(path)
    state, metadata = read_state_dict(path)
    digest = digest or sha256_file(path)

    if decoder_path is not None and not _is_encoder_only(state):
        raise CheckpointError(
            f"{decoder_path}: a decoder checkpoint (--decoder) completes an encoder-only checkpoint, but {path} "
            "already holds a whole model (its own prompt encoder and mask decoder); leave --decoder out"
        )
    if _is_encoder_only(state):
        if decoder_path is None:
            raise CheckpointError(
                f"{path}: holds only an image encoder (keys like 'blocks.0.mlp.lin1.weight' without the "
                "'image_encoder.' prefix). Pass decoder_path= (--decoder on the command line) with a full "
                "checkpoint whose prompt encoder and mask decoder to use."
            )
        decoder_state, decoder_metadata = read_state_dict(decoder_path)
        state = {f"image_encoder.{k}": v for k, v in state.items()}
        state.update({k: v for k, v in decoder_state.items() if not k.startswith("image_encoder.")})
        decoder_config = _config_from_metadata(decoder_metadata, Path(decoder_path)) or {}
    else:
        decoder_config = {}

    overrides = dict(_config_from_metadata(metadata, path) or {})
    if "first_click_multimask" in decoder_config:  # how the decoder answers a first click: the decoder file's setting
        overrides["first_click_multimask"] = decoder_config["first_click_multimask"]
    overrides.update(config or {})
    try:
        cfg = infer_config(state, overrides)
    except KeyError as error:
        raise CheckpointError(
            f"{path}: missing key {error.args[0]!r}: not a FastSAM3D / SAM-Med3D checkpoint "
            "(expected keys like image_encoder.pos_embed, prompt_encoder.no_mask_embed.weight, "
            "mask_decoder.mask_tokens.weight)"
        ) from None
    except ValueError as error:
        raise CheckpointError(f"{path}: unsupported architecture: {error}") from None
    model = _build_checked(cfg, state, path)
    load_state_into(model, state, path)
    model.config.update(source=str(path), sha256=digest)
    return model.to(resolve_device(device)).eval()


def load_image_encoder(path: str | os.PathLike, device: str | torch.device = "auto") -> ImageEncoderViT3D:
    """Only the image encoder of a full or encoder-only checkpoint (e.g. a distillation teacher)."""
    path = Path(path)
    state, metadata = read_state_dict(path)
    if _is_encoder_only(state):
        state = {f"image_encoder.{k}": v for k, v in state.items()}
    encoder_state = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
    if not encoder_state:
        raise CheckpointError(f"{path}: no image encoder weights (no keys starting with 'image_encoder.' or 'patch_embed.')")
    try:
        cfg = infer_config(encoder_state, _config_from_metadata(metadata, path), encoder_only=True)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot infer the image encoder architecture: {error}") from None
    encoder_state = {k[len("image_encoder."):]: v for k, v in encoder_state.items()}
    encoder = _build_checked(cfg, {f"image_encoder.{k}": v for k, v in encoder_state.items()}, path, encoder_only=True)
    encoder = encoder.image_encoder
    load_state_into(encoder, encoder_state, path)
    return encoder.to(resolve_device(device)).eval()


def _atomic_write(path: Path, write) -> None:
    from .staging import StagedFile, commit_staged  # temp file + rename, fsync, the usual (umask) permissions

    path.parent.mkdir(parents=True, exist_ok=True)
    stage = StagedFile(path)
    try:
        stage.write(write)
        commit_staged([stage])
    finally:
        stage.discard()


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None
) -> str:
    """Write weights as safetensors (atomically) plus ``<file>.sha256``; return the digest.

    ``metadata`` values that are not strings are stored as JSON.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "pt")
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    digest = sha256_file(path)
    write_checksum_file(path, digest)
    return digest


def write_checksum_file(path: str | os.PathLike, digest: str) -> None:
    """Write ``<file>.sha256`` (``sha256sum`` format) for ``path`` atomically."""
    path = Path(path)
    _atomic_write(_checksum_path(path), lambda tmp: Path(tmp).write_text(f"{digest}  {path.name}\n"))


def save_model(model: Sam3D, path: str | os.PathLike, metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Save a model as safetensors with its architecture in the metadata; return the sha256."""
    config = {k: v for k, v in model.config.items() if k not in ("source", "sha256")}
    return save_safetensors(model.state_dict(), path, {"config": config, **(metadata or {})})


def convert_checkpoint(source: str | os.PathLike, destination: str | os.PathLike, trust: bool = False) -> str:
    """Rewrite a pickled checkpoint as a weights-only safetensors file (+ sha256); return the digest.

    A file that ``torch.load(weights_only=True)`` accepts needs no trust. Any other file is fully
    unpickled — which runs whatever code it carries — so that requires ``trust=True``.
    """
    source, destination = Path(source), Path(destination)
    try:
        state, metadata = read_state_dict(source)
    except CheckpointError as error:
        if not trust or not source.exists() or "refused" not in str(error):
            raise
        logger.warning("unpickling %s with weights_only=False because it was explicitly trusted", source)
        try:
            obj = torch.load(str(source), map_location="cpu", weights_only=False)
        except Exception as load_error:  # the file is arbitrary: report whatever it raised
            raise CheckpointError(f"{source}: could not be unpickled even when trusted: {load_error}") from None
        state, metadata = _extract_state_dict(obj, source), {}
    metadata = {**metadata, "converted_from": source.name, "source_sha256": sha256_file(source)}
    return save_safetensors(state, destination, metadata)
