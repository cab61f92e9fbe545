"""The LLM decoder on ONNX Runtime: the exported ``llm_prefill`` / ``llm_decode`` graphs behind the shared
`Decoder` loop (prompt split, sampling, streaming, boxes, crop-back are the reference's own code).

State between steps is the per-layer KV list. On CPU it is numpy arrays fed to ``session.run``. With I/O
binding (the default on CUDA) the KV stays on the device as OrtValues from one step to the next; only
the embeddings and positions go up and the logits and hidden state [1, D] come down per step.

A crop back to the scene prefix (after every question) restores the KV the prefill produced: the graphs
never write into their inputs, so those arrays are still intact and the crop copies nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vidllm_edge.errors import CheckpointError, DependencyError, InputError
from vidllm_edge.models.config import LLMConfig
from vidllm_edge.models.llm import (LLM_DECODE_FILE, LLM_EMBED_FILE, LLM_EMBED_KEY, LLM_PREFILL_FILE, Decoder,
                                    llm_io_names)
from vidllm_edge.optional import require

_EXPORT_NOTE = ("Run `vidllm-edge export` first; it writes llm_prefill.onnx, llm_decode.onnx and "
                "llm_embed.safetensors into the artifact folder.")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_META_KEYS = ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "max_context")

Provider = str | tuple[str, dict[str, Any]]


class OrtDecoder(Decoder):
    """`Decoder` over the exported graphs in ``folder`` on ONNX Runtime.

    Args:
        folder: artifact folder with llm_prefill.onnx, llm_decode.onnx, llm_embed.safetensors.
        tokenizer: the LLM's tokenizer; cfg: the `LLMConfig` (prompt template, image and loc tokens).
        box_fn: grounding head, hidden [1, D] float32 CPU tensor -> boxes [1, 6] (tensor or ndarray):
            the torch `BoxHead` or a box_head backend unit.
        providers: ONNX Runtime execution providers, names or (name, options); first is preferred.
            A requested provider that ONNX Runtime cannot use is an error, never a silent CPU run.
        io_binding: keep the KV cache on the device between steps; default: on for CUDA, off for CPU.
    """

    def __init__(self, folder: str | Path, tokenizer, cfg: LLMConfig, box_fn: Callable[[torch.Tensor], Any], *,
                 providers: Sequence[Provider] | None = None, io_binding: bool | None = None) -> None:
        self._ort = require("onnxruntime", "the ONNX Runtime LLM decoder")
        super().__init__(tokenizer, cfg)
        self.folder = Path(folder)
        self.box_fn = box_fn
        providers = list(providers or ["CPUExecutionProvider"])
        paths = _artifact_paths(self.folder)
        self._prefill = _session(self._ort, paths[LLM_PREFILL_FILE], providers)
        self._decode = _session(self._ort, paths[LLM_DECODE_FILE], providers)
        self.geometry = _read_geometry(self._prefill, paths[LLM_PREFILL_FILE])
        layers = self.geometry["num_layers"]
        self._names = {}
        for session, file, with_past in ((self._prefill, LLM_PREFILL_FILE, False), (self._decode, LLM_DECODE_FILE, True)):
            expected = llm_io_names(layers, with_past)
            got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
            if got != expected:
                raise CheckpointError(f"LLM graph: {paths[file]}", f"has inputs {got[0]} and outputs {got[1]}.",
                                      f"Expected inputs {expected[0]} and outputs {expected[1]}. " + _EXPORT_NOTE)
            self._names[with_past] = expected
        self._dtype = _ORT_DTYPES.get(self._prefill.get_inputs()[0].type, np.float32)
        self._table = _load_table(paths[LLM_EMBED_FILE], self.geometry)
        name, options = _provider_entry(providers[0])
        self._device = "cuda" if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self._device_id = int(options.get("device_id", 0))
        self._io_binding = self._device != "cpu" if io_binding is None else io_binding
        self._past: list[Any] = []  # per layer: key, value as np.ndarray (or OrtValue with I/O binding)
        self._len = 0
        self._prefix: tuple[int, list[Any]] | None = None  # (length, KV) right after the last prefill

    # -- Decoder hooks ------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.geometry["max_context"]

    def _embed(self, ids: list[int]) -> torch.Tensor:  # -> [1, T, D]
        return torch.from_numpy(self._table[np.asarray(ids, dtype=np.int64)][None])

    def _reset(self) -> None:
        self._past, self._len, self._prefix = [], 0, None

    def _seq_len(self) -> int:
        return self._len

    def _forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.geometry["hidden_size"]:
            raise InputError("Input tensor: inputs_embeds", f"Received shape {list(embeds.shape)}.",
                             f"Expected [1, T, {self.geometry['hidden_size']}].")
        tokens = embeds.shape[1]
        with_past = self._len > 0
        inputs, outputs = self._names[with_past]
        feed: dict[str, Any] = {
            "inputs_embeds": embeds.detach().cpu().numpy().astype(self._dtype, copy=False),
            "position_ids": np.arange(self._len, self._len + tokens, dtype=np.int64)[None],
        }
        feed.update(zip(inputs[2:], self._past))
        logits, hidden, *present = self._run(self._decode if with_past else self._prefill, feed, outputs)
        self._past, self._len = present, self._len + tokens
        if not with_past:
            self._prefix = (self._len, list(present))
        return (torch.from_numpy(np.asarray(logits[0], dtype=np.float32)),
                torch.from_numpy(np.asarray(hidden[0], dtype=np.float32)))

    def _crop(self, length: int) -> None:
        if length >= self._len:
            return
        if length == 0:
            self._reset()
            return
        if self._prefix is not None and self._prefix[0] == length:
            self._past = list(self._prefix[1])
        else:  # a general crop: through the host, since OrtValues cannot be sliced on the device
            host = [np.ascontiguousarray(self._to_host(v)[:, :, :length]) for v in self._past]
            self._past = [self._to_device(a) for a in host] if self._io_binding else host
            if self._prefix is not None and length < self._prefix[0]:
                self._prefix = None  # positions inside the prefix may now be rewritten
        self._len = length

    def _box(self, hidden: torch.Tensor) -> list[float]:
        out = self.box_fn(hidden[None].float().cpu())  # [D] -> [1, D] -> [1, 6]
        box = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
        assert box.shape == (1, 6), f"box_fn returned shape {list(box.shape)}, expected [1, 6]"
        return [float(v) for v in box[0]]

    # -- ONNX Runtime ---------------------------------------------------------------------------------
    def _run(self, session, feed: dict[str, Any], outputs: list[str]) -> list[Any]:
        """One graph run; logits and hidden come back as numpy, the presents stay where the KV lives."""
        if not self._io_binding:
            return session.run(outputs, feed)
        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, self._to_device(value) if isinstance(value, np.ndarray) else value)
        for name in outputs:
            if name in ("logits", "hidden"):
                binding.bind_output(name, "cpu")
            else:  # ORT allocates them on the device; they become the next step's past inputs
                binding.bind_output(name, self._device, self._device_id)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()  # in binding order, which is `outputs` order
        return [values[0].numpy(), values[1].numpy(), *values[2:]]

    def _to_device(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device, self._device_id)

    @staticmethod
    def _to_host(value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()


def _provider_entry(provider: Provider) -> tuple[str, dict[str, Any]]:
    return (provider, {}) if isinstance(provider, str) else (provider[0], dict(provider[1]))


def _artifact_paths(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise CheckpointError(f"LLM artifact folder: {folder}", "does not exist.", _EXPORT_NOTE)
    paths = {name: folder / name for name in (LLM_PREFILL_FILE, LLM_DECODE_FILE, LLM_EMBED_FILE)}
    for path in paths.values():
        if not path.is_file():
            raise CheckpointError(f"LLM artifact: {path}", "is missing.", _EXPORT_NOTE)
    return paths


def _session(ort, path: Path, providers: Sequence[Provider]):
    available = set(ort.get_available_providers())
    names = [_provider_entry(p)[0] for p in providers]
    missing = [n for n in names if n not in available]
    if missing:
        raise DependencyError(f"ONNX Runtime providers: {missing}", f"are not available (installed: {sorted(available)}).",
                              "Install onnxruntime-gpu for CUDA, or pass providers=['CPUExecutionProvider'].")
    import warnings

    from vidllm_edge.runtime.ort_backend import check_started

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            session = ort.InferenceSession(str(path), providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        raise CheckpointError(f"LLM graph: {path}", f"cannot be loaded by ONNX Runtime ({type(exc).__name__}: "
                              f"{str(exc).strip()[:300]}).", "The file is truncated or corrupted. " + _EXPORT_NOTE) from exc
    check_started(session, names[0], path, [str(w.message) for w in caught])  # ORT falls back to CPU quietly
    return session


def _read_geometry(session, path: Path) -> dict[str, int]:
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in _META_KEYS if f"vidllm.{k}" not in meta]
    if missing:
        raise CheckpointError(f"LLM graph: {path}", f"has no vidllm metadata {missing}.", _EXPORT_NOTE)
    return {k: int(meta[f"vidllm.{k}"]) for k in _META_KEYS}


def _load_table(path: Path, geometry: dict[str, int]) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"LLM artifact: {path}", f"cannot be read ({exc}).",
                              "The file is truncated or corrupted. " + _EXPORT_NOTE) from exc
    expected = (geometry["vocab_size"], geometry["hidden_size"])
    table = tensors.get(LLM_EMBED_KEY)
    if table is None or table.shape != expected:
        got = "no tensor" if table is None else f"shape {list(table.shape)}"
        raise CheckpointError(f"LLM artifact: {path}", f"has {got} under {LLM_EMBED_KEY!r}.",
                              f"Expected [{expected[0]}, {expected[1]}] from the graphs' metadata. " + _EXPORT_NOTE)
    return table
