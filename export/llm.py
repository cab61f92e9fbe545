"""Export of the LLM decoder as two ONNX graphs (``llm_prefill``, ``llm_decode``) plus its embedding table.

The graphs take ``inputs_embeds`` (visual tokens enter the LLM as embeddings, so the token embedding
runs in the runtime from ``llm_embed.safetensors``) and flat per-layer KV tensors. `LLMStep` is the
export-only wrapper that turns the flat tensors into a `transformers` DynamicCache around the unchanged
reference model, so grouped-query attention and rotary positions are exactly the source model's.

Opset 18: LayerNormalization/RMS ops stay whole from 17 on, and 23 would emit the ONNX ``Attention``
op, whose TensorRT parser support is not established (FINDINGS.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vidllm_edge import atomic
from vidllm_edge.errors import ConfigError, InputError, VidLLMError
from vidllm_edge.models.llm import (LLM_DECODE_FILE, LLM_EMBED_FILE, LLM_EMBED_KEY, LLM_PREFILL_FILE, cache_argument,
                                    llm_io_names)
from vidllm_edge.optional import require

__all__ = ["LLMStep", "export_llm", "llm_io_names", "llm_dummy_inputs", "llm_geometry", "OPSET", "TOLERANCE"]

log = logging.getLogger(__name__)

OPSET = 18
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # fp32 ORT CPU vs torch eager; a wrong kernel is off by far more
_EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB limit, with headroom for the graph itself
# Example sizes for tracing: above 1 so the exporter keeps the axes symbolic (0/1 get specialised).
_EXAMPLE_T, _EXAMPLE_PAST = 3, 5


def llm_geometry(llm: nn.Module) -> dict[str, int | str]:
    """Shapes the graphs and the runtime agree on: layers, KV heads, head dim, width, vocab, context."""
    cfg = llm.config
    heads = int(cfg.num_attention_heads)
    return {
        "model_type": str(cfg.model_type),
        "num_layers": int(cfg.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "max_context": int(cfg.max_position_embeddings),
    }


class LLMStep(nn.Module):
    """Export-only wrapper: flat tensors in, flat tensors out, one prefill or decode step.

    ``forward(inputs_embeds [1,T,D], position_ids [1,T], *past)`` where ``past`` is empty (prefill) or
    past_key_0, past_value_0, past_key_1, ... each [1, Hkv, past, Dh]. Returns logits [1, V] and the
    final-norm hidden state [1, D] of the last position, then present_key_0, present_value_0, ...
    [1, Hkv, past+T, Dh].
    """

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm
        self.num_layers = int(llm.config.num_hidden_layers)
        self._cache_arg = cache_argument(llm.get_decoder())

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        assert len(past) in (0, 2 * self.num_layers), f"expected 0 or {2 * self.num_layers} past tensors, got {len(past)}"
        pairs = list(zip(past[0::2], past[1::2])) if past else None
        cache = DynamicCache(pairs, config=self.llm.config)
        # The decoder body, then the LM head on the last position only: the same math as the reference's
        # llm(...).logits[:, -1] and hidden_states[-1][:, -1] (transformers ties hidden_states[-1] to the
        # final-norm output), without the output-capturing hooks that tracing cannot follow.
        out = self.llm.get_decoder()(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=True,
                                     **{self._cache_arg: cache})
        hidden = out.last_hidden_state[:, -1]  # [1, T, D] -> [1, D]
        logits = self.llm.get_output_embeddings()(hidden)  # [1, V]
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, hidden, *presents)


def llm_dummy_inputs(llm: nn.Module, with_past: bool, tokens: int = _EXAMPLE_T,
                     past: int = _EXAMPLE_PAST) -> tuple[torch.Tensor, ...]:
    """Example inputs of one graph, in `llm_io_names` order, on the LLM's device and dtype."""
    geo = llm_geometry(llm)
    param = next(llm.parameters())
    start = past if with_past else 0
    feed = [torch.randn(1, tokens, geo["hidden_size"], dtype=param.dtype, device=param.device),
            torch.arange(start, start + tokens, device=param.device)[None]]
    if with_past:
        kv = (1, geo["num_kv_heads"], past, geo["head_dim"])
        feed += [torch.randn(kv, dtype=param.dtype, device=param.device) for _ in range(2 * geo["num_layers"])]
    return tuple(feed)


def _dynamic_shapes(num_layers: int, max_context: int, with_past: bool):
    tokens = torch.export.Dim("T", min=1, max=max_context)
    shapes: list = [{1: tokens}, {1: tokens}]
    if with_past:
        past = torch.export.Dim("past", min=1, max=max_context)
        shapes.append(tuple({2: past} for _ in range(2 * num_layers)))  # the *past varargs form one entry
    return tuple(shapes)


def _check_exportable(llm: nn.Module) -> None:
    layer_types = getattr(llm.config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"LLM layer types: {sorted(set(layer_types))}",
                          "include sliding-window layers; the exported KV cache is a plain full-attention cache.",
                          "Export a model without sliding-window attention (for Qwen2: use_sliding_window=false).")


def _export_graph(step: LLMStep, out_dir: Path, name: str, with_past: bool, opset: int) -> Path:
    """Trace one graph and write ``out_dir/name`` atomically (plus ``name.data`` when the weights are large)."""
    require("onnxscript", "ONNX export")
    geo = llm_geometry(step.llm)
    inputs, outputs = llm_io_names(geo["num_layers"], with_past)
    with torch.no_grad(), warnings.catch_warnings():
        # Exporter chatter that says nothing about this model: shared dynamic-axis names, torch's own pytree.
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
        program = torch.onnx.export(
            step, llm_dummy_inputs(step.llm, with_past), dynamo=True, opset_version=opset,
            dynamic_shapes=_dynamic_shapes(geo["num_layers"], geo["max_context"], with_past),
            input_names=inputs, output_names=outputs, verbose=False)
    for key, value in geo.items():  # the runtime reads these instead of needing the HF config
        program.model.metadata_props[f"vidllm.{key}"] = str(value)
    weight_bytes = sum(p.numel() * p.element_size() for p in step.llm.parameters())
    external = weight_bytes > _EXTERNAL_DATA_BYTES
    # Saved under the final name inside a staging folder (external data records its file name), then
    # moved: the data file first, the graph last, so the graph never points at a missing or old file.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        program.save(staging / name, external_data=external)
        data = staging / f"{name}.data"
        if data.exists():
            os.replace(data, out_dir / data.name)
        else:
            (out_dir / data.name).unlink(missing_ok=True)  # a stale one from an earlier, larger export
        os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / name


def _write_embed_table(llm: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    table = llm.get_input_embeddings().weight.detach().to("cpu").contiguous()
    with atomic.atomic_path(path, suffix=".safetensors") as tmp:
        save_file({LLM_EMBED_KEY: table}, str(tmp))
    return path


def validate_llm_graph(step: LLMStep, path: Path, with_past: bool, tokens: int, past: int) -> dict[str, float]:
    """Run ``path`` on ONNX Runtime (CPU) and the wrapper on the same inputs; check names, shapes, values.

    Returns the max-abs difference per output; raises VidLLMError listing every failing output.
    """
    ort = require("onnxruntime", "ONNX validation")
    geo = llm_geometry(step.llm)
    inputs, outputs = llm_io_names(geo["num_layers"], with_past)
    feed = llm_dummy_inputs(step.llm, with_past, tokens, past)
    with torch.no_grad():
        expected = [t.detach().float().cpu().numpy() for t in step(*feed)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_in, got_out = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if got_in != inputs or got_out != outputs:
        raise VidLLMError(f"Exported graph: {path}", f"has inputs {got_in} and outputs {got_out}.",
                          f"Expected inputs {inputs} and outputs {outputs}; this is an exporter bug.")
    got = session.run(None, {n: t.cpu().numpy() for n, t in zip(inputs, feed)})
    diffs, problems = {}, []
    for name, ref, out in zip(outputs, expected, got):
        if ref.shape != out.shape:
            problems.append(f"{name}: shape {list(out.shape)}, expected {list(ref.shape)}")
            continue
        diffs[name] = float(np.abs(ref - out.astype(np.float32)).max()) if ref.size else 0.0
        if not np.allclose(out, ref, **TOLERANCE):
            problems.append(f"{name}: max-abs {diffs[name]:.3g} over atol {TOLERANCE['atol']}, rtol {TOLERANCE['rtol']}")
    if problems:
        raise VidLLMError(f"Exported graph: {path}", "differs from the torch reference: " + "; ".join(problems) + ".",
                          "Check the exporter version and the attention implementation (eager or sdpa).")
    return diffs


def export_llm(llm: nn.Module, out_dir: str | Path, opset: int = OPSET, validate: bool = True) -> dict[str, Path]:
    """Export ``llm`` (a `transformers` causal LM of the LLaMA/Qwen2 families) into ``out_dir``.

    Writes ``llm_prefill.onnx`` (no past; dynamic T), ``llm_decode.onnx`` (past KV with dynamic ``past``
    and dynamic T >= 1) and ``llm_embed.safetensors`` (the input embedding table [V, D]). Every file is
    written atomically; weights over ~2 GB go to one external data file per graph (``<graph>.onnx.data``).
    With ``validate`` each graph is checked against the wrapper on ONNX Runtime CPU at shapes other than
    the traced ones. Returns {"llm_prefill", "llm_decode", "llm_embed"} -> path.
    """
    if opset < 17:
        raise InputError(f"Opset: {opset}", "is below 17 (LayerNormalization would be decomposed).",
                         f"Use opset {OPSET}.")
    _check_exportable(llm)
    out_dir = atomic.ensure_dir(out_dir, "Export folder")
    step = LLMStep(llm).eval()
    paths: dict[str, Path] = {}
    for name, file, with_past in (("llm_prefill", LLM_PREFILL_FILE, False), ("llm_decode", LLM_DECODE_FILE, True)):
        start = time.perf_counter()
        paths[name] = _export_graph(step, out_dir, file, with_past, opset)
        log.info("exported %s in %.1f s", paths[name], time.perf_counter() - start)
        if validate:
            diffs = validate_llm_graph(step, paths[name], with_past, tokens=_EXAMPLE_T + 4 if not with_past else 1,
                                       past=_EXAMPLE_PAST + 2)
            log.info("validated %s: max-abs %s", file, {k: f"{v:.2g}" for k, v in diffs.items()})
    paths["llm_embed"] = _write_embed_table(llm, out_dir / LLM_EMBED_FILE)
    return paths
