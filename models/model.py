"""The whole Vid-LLM as one module, and our checkpoint format (`save_pretrained` / `from_pretrained`).

`VidLLM` only owns the parts and their weights; the stage-by-stage data flow (sampling, scale
alignment, lifting, pooling, prompting) lives in `vidllm_edge.runtime.pipeline`, so every backend
chains the same stages.

Checkpoint folder: ``config.json`` (VidLLMConfig), ``model.safetensors`` (every weight; tied tensors are
stored once and their aliases recorded in the metadata), and the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vidllm_edge import atomic
from vidllm_edge.errors import CheckpointError
from vidllm_edge.models import checkpoint as ckpt
from vidllm_edge.models.adapter import CrossTaskAdapter
from vidllm_edge.models.config import VidLLMConfig, from_name
from vidllm_edge.models.encoder import build_encoder
from vidllm_edge.models.geometry import GeometryTransformer
from vidllm_edge.models.lift import PositionMLP
from vidllm_edge.models.llm import BoxHead, Projector, build_llm, materialize_rotary
from vidllm_edge.models.metric_depth import MetricDepth
from vidllm_edge.models.tokenizer import load_tokenizer, save_tokenizer, tiny_tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class VidLLM(nn.Module):
    """Encoder, Cross-Task Adapter, geometry, metric depth, 3D position MLP, projector, LLM, box head."""

    def __init__(self, cfg: VidLLMConfig, tokenizer=None) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.encoder = build_encoder(cfg)
        self.adapter = CrossTaskAdapter(dim, cfg.adapter)
        self.geometry = GeometryTransformer(cfg.vggt)
        self.metric_depth = MetricDepth(cfg)
        self.pos_mlp = PositionMLP(dim, cfg.scene.pos_mlp_hidden)
        self.llm = build_llm(cfg.llm)
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(cfg)
        if len(self.tokenizer) > self.llm.get_input_embeddings().num_embeddings:
            self.llm.resize_token_embeddings(len(self.tokenizer))
        dim_llm = self.llm.config.hidden_size
        self.projector = Projector(dim, dim_llm)
        self.box_head = BoxHead(dim_llm, cfg.llm.box_head_hidden)

    @property
    def dim_llm(self) -> int:
        return int(self.llm.config.hidden_size)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json, model.safetensors and the tokenizer to ``folder`` (each file atomically)."""
        from safetensors.torch import save_file

        folder = atomic.ensure_dir(folder, "Checkpoint folder")
        state, aliases = _dedup_state(self.state_dict())
        with atomic.atomic_path(folder / WEIGHTS_NAME, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "vidllm-edge", "version": str(FORMAT_VERSION),
                                                   "aliases": json.dumps(aliases)})
        save_tokenizer(self.tokenizer, folder)
        atomic.write_text(folder / CONFIG_NAME, json.dumps(self.portable_config().to_dict(), indent=2))
        return folder

    def portable_config(self) -> VidLLMConfig:
        """The config with local part folders replaced by the built configs (the checkpoint holds all weights)."""
        cfg = VidLLMConfig.from_dict(self.cfg.to_dict())
        hf = self.llm.config.to_diff_dict()
        hf["model_type"] = self.llm.config.model_type
        hf["vocab_size"] = self.llm.get_input_embeddings().num_embeddings
        for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            hf.pop(key, None)
        cfg.llm.hf_config, cfg.llm.path = hf, None
        clip = getattr(self.encoder, "hf_config", None)
        if cfg.encoder.kind == "clip" and clip is not None:
            cfg.encoder.clip, cfg.encoder.path = clip.to_diff_dict(), None
        return cfg


def default_tokenizer(cfg: VidLLMConfig):
    """The LLM folder's tokenizer when the LLM comes from a folder, else the shipped tiny BPE."""
    if cfg.llm.path:
        return load_tokenizer(cfg.llm.path)
    return tiny_tokenizer()


def _dedup_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied embeddings) once; return {alias: stored key}."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        out[key] = value.contiguous()
    return out, aliases


def build_model(cfg: VidLLMConfig | str, seed: int = 0) -> VidLLM:
    """Build a model with seeded random weights (parts with a local folder in the config load from it)."""
    cfg = from_name(cfg) if isinstance(cfg, str) else cfg
    torch.manual_seed(seed)
    return VidLLM(cfg).eval()


def from_pretrained(folder: str | Path) -> VidLLM:
    """Load our checkpoint folder without random init (meta device, memory-mapped safetensors, strict keys)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Checkpoint folder: {folder}", "does not exist or is not a folder.",
                              "Pass a folder written by save_pretrained (config.json, model.safetensors, tokenizer).")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise CheckpointError(f"Checkpoint folder: {folder}", f"has no {name}.",
                                  "Pass a folder written by save_pretrained (config.json, model.safetensors, tokenizer).")
    try:
        cfg = VidLLMConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"Checkpoint config: {folder / CONFIG_NAME}", f"is not valid JSON ({exc}).",
                              "Re-save the checkpoint with save_pretrained.") from exc
    tokenizer = load_tokenizer(folder)
    state = ckpt.read_state_dict(folder / WEIGHTS_NAME)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    for alias, key in aliases.items():
        if key in state:
            state[alias] = state[key]
    model = ckpt.build_on_meta(lambda: VidLLM(cfg, tokenizer=tokenizer))
    ckpt.load_into(model, state, f"Checkpoint: {folder / WEIGHTS_NAME}",
                   "The weights do not fit config.json: was the folder assembled from two different models?")
    materialize_rotary(model.llm)
    if aliases:
        model.llm.tie_weights()
    ckpt.assert_materialized(model, f"Checkpoint: {folder}")
    return model.eval()
