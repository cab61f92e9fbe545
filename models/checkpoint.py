"""Checkpoint reading and strict key/shape checking, shared by every loader.

Weights are read from safetensors (memory-mapped) or from a ``.pt`` state dict with
``weights_only=True``; never through pickle of arbitrary objects. Modules are built on the ``meta``
device and filled with ``load_state_dict(assign=True)`` so no time is spent on random init.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from vidllm_edge.errors import CheckpointError

_MAX_LISTED = 20


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (``.safetensors``, or ``.pt``/``.pth``/``.bin`` with weights_only).

    Raises CheckpointError for a missing, truncated or otherwise unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file: {path}", "does not exist.",
                              "Pass the path of a model.safetensors (or .pt state dict) file or its folder.")
    if path.suffix == ".safetensors":
        _check_safetensors_header(path)
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"Checkpoint file: {path}", f"cannot be read as safetensors ({exc}).",
                                  "The file is damaged or incomplete: download or copy it again.") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"Checkpoint file: {path}", f"cannot be read as a weights-only state dict ({exc}).",
                              "Pass a safetensors file, or a .pt file holding a plain state dict of tensors.") from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # training checkpoints often wrap the state dict
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"Checkpoint file: {path}", "does not hold a flat state dict of tensors.",
                              "Save it with torch.save(model.state_dict(), path) or as safetensors.")
    return dict(obj)


def _check_safetensors_header(path: Path) -> None:
    """Detect truncation before safetensors does, so the message says what is wrong."""
    size = path.stat().st_size
    subject = f"Checkpoint file: {path}"
    fix = "The file is truncated or damaged: download or copy it again."
    if size < 8:
        raise CheckpointError(subject, f"is {size} bytes, too short for a safetensors header.", fix)
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if 8 + header_len > size:
            raise CheckpointError(subject, f"header claims {header_len} bytes but the file has {size}.", fix)
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(subject, f"has an unreadable safetensors header ({exc}).", fix) from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(subject, f"is truncated: tensors need {8 + header_len + end} bytes, the file has {size}.",
                              fix)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def check_state_dict(expected: Mapping[str, tuple[int, ...] | torch.Size],
                     got: Mapping[str, torch.Tensor], subject: str, hint: str = "") -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key at once."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = sorted(f"{k} (checkpoint {list(got[k].shape)}, model {list(expected[k])})"
                       for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped key(s): {_listing(misshaped)}")
    if problems:
        raise CheckpointError(subject, "does not match the model: " + "; ".join(problems) + ".",
                              hint or "Check that the checkpoint and the config describe the same model size.")


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the module's persistent state (works on meta-device modules)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating or initialising its weights."""
    with torch.device("meta"):
        return factory()


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], subject: str, hint: str = "") -> nn.Module:
    """Strictly check ``state`` against ``module`` and assign it (module may live on meta).

    Non-persistent buffers (e.g. normalisation constants, RoPE tables) are rebuilt on CPU afterwards
    by modules that define ``reset_buffers()``.
    """
    check_state_dict(expected_shapes(module), state, subject, hint)
    ref = module.state_dict()
    cast = {k: v.to(ref[k].dtype) if v.dtype != ref[k].dtype else v for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    for sub in module.modules():
        reset = getattr(sub, "reset_buffers", None)
        if callable(reset):
            reset()
    return module


def assert_materialized(module: nn.Module, subject: str) -> None:
    """Fail if any parameter or buffer is still on the meta device after loading."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(subject, f"left {len(left)} tensor(s) without values: {_listing(left)}.",
                              "This is a bug in the loader for this architecture; please report it.")
