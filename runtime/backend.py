"""The one backend interface (DESIGN.md §5): named tensors in, named tensors out, validated first.

A backend unit is built for one image size (H, W are fixed per build; frame counts are dynamic), so
symbolic dims ``H``/``W``/``P``/``C`` are bound at construction and ``S``-like dims per call.
"""

from __future__ import annotations

from typing import Mapping

import torch

from vidllm_edge.errors import InputError
from vidllm_edge.units import TensorSpec, UnitSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class Backend:
    """Base class: ``backend(feed) -> outputs``; subclasses implement ``_run``."""

    name = "base"

    def __init__(self, spec: UnitSpec, bound: Mapping[str, int] | None = None) -> None:
        self.spec = spec
        self.bound = dict(bound or {})

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.spec.outputs

    def __call__(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        validate_feed(self.spec, feed, self.bound)
        return self._run(dict(feed))

    def _run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def validate_feed(spec: UnitSpec, feed: Mapping[str, torch.Tensor], bound: Mapping[str, int]) -> dict[str, int]:
    """Check names, dtypes and shapes of ``feed`` against ``spec``; return the symbol bindings.

    Every problem is an InputError naming the tensor, what was received and what is expected.
    """
    names = [t.name for t in spec.inputs]
    missing = [n for n in names if n not in feed]
    extra = [n for n in feed if n not in names]
    if missing or extra:
        raise InputError(f"Unit: {spec.name}", f"got inputs {sorted(feed)}; missing {missing}, unexpected {extra}.",
                         f"Feed exactly {names}.")
    symbols = dict(bound)
    for t in spec.inputs:
        value = feed[t.name]
        known = {d: symbols[d] for d in t.shape if isinstance(d, str) and d in symbols}
        expected = f"Expected {t.describe()}" + (f" with {_bindings(known)}." if known else ".")
        if not isinstance(value, torch.Tensor):
            raise InputError(f"Input tensor: {t.name}", f"Received {type(value).__name__}, not a tensor.", expected)
        if value.dtype != _DTYPES[t.dtype]:
            raise InputError(f"Input tensor: {t.name}", f"Received dtype {str(value.dtype).replace('torch.', '')}.",
                             expected)
        if value.dim() != len(t.shape):
            raise InputError(f"Input tensor: {t.name}", f"Received shape {list(value.shape)}.", expected)
        for dim, size in zip(t.shape, value.shape):
            if isinstance(dim, int):
                ok = size == dim
            else:
                ok = symbols.setdefault(dim, int(size)) == size and size > 0
            if not ok:
                raise InputError(f"Input tensor: {t.name}", f"Received shape {list(value.shape)}.", expected)
    return symbols


def _bindings(symbols: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in symbols.items())
