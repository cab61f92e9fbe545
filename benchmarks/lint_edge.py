"""TensorRT 10 lint of the `edge` preset's small units and LLM graphs, exported on this CPU machine.

    python -m vidllm_edge.benchmarks.lint_edge --out benchmarks/results

Perception and geometry (1.2B parameters) are exported and linted on the GPU machine by
`gpu_onnx_parity` (its JSON carries their lint). Here: metric_depth, lift_project, projector and box_head
at their real `edge` shapes, and llm_prefill / llm_decode of a Qwen2.5-1.5B-shaped decoder cut to 2 layers
(every layer is the same graph, so the operator set is that of 28; a full 1.5B export needs ~35 GB RAM).
Random weights. Writes lint_edge.json and lint_edge.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from vidllm_edge.export.lint import lint_onnx
from vidllm_edge.export.onnx_export import export_unit
from vidllm_edge.export.specs import SPECS
from vidllm_edge.models.config import from_name


class _Parts(nn.Module):
    """The parts of an edge-shaped VidLLM that the small units read (no encoder, geometry or LLM)."""

    def __init__(self, cfg, dim_llm: int) -> None:
        from vidllm_edge.models.lift import PositionMLP
        from vidllm_edge.models.llm import BoxHead, Projector
        from vidllm_edge.models.metric_depth import MetricDepth

        super().__init__()
        self.cfg = cfg
        self.dim_llm = dim_llm
        self.encoder = nn.Identity()
        self.metric_depth = MetricDepth(cfg)
        self.pos_mlp = PositionMLP(cfg.embed_dim, cfg.scene.pos_mlp_hidden)
        self.projector = Projector(cfg.embed_dim, dim_llm)
        self.box_head = BoxHead(dim_llm, cfg.llm.box_head_hidden)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--image-hw", default="518x518")
    args = parser.parse_args(argv)
    hw = tuple(int(v) for v in args.image_hw.split("x"))
    cfg = from_name("edge")
    torch.manual_seed(0)
    parts = _Parts(cfg, cfg.llm.hf_config["hidden_size"]).eval()
    report = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "image_hw": list(hw), "units": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("metric_depth", "lift_project", "projector", "box_head"):
            path = Path(tmp) / f"{name}.onnx"
            export_unit(SPECS[name], parts, hw, path, "fp16")
            report["units"][name] = lint_onnx(path).to_dict()
            print(name, "ok" if report["units"][name]["ok"] else "ERRORS", flush=True)
        from vidllm_edge.export.llm import export_llm
        from vidllm_edge.models.config import LLMConfig
        from vidllm_edge.models.llm import build_llm

        llm_cfg = dict(cfg.llm.hf_config, num_hidden_layers=2)
        paths = export_llm(build_llm(LLMConfig(hf_config=llm_cfg)), Path(tmp) / "llm", validate=False)
        for name in ("llm_prefill", "llm_decode"):
            report["units"][name] = lint_onnx(paths[name]).to_dict()
            print(name, "ok" if report["units"][name]["ok"] else "ERRORS", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lint_edge.json").write_text(json.dumps(report, indent=2))
    lines = ["# TensorRT 10 lint, `edge` preset units (CPU export, random weights)", "",
             f"{report['date']}, torch {report['torch']}, frames {hw[0]}x{hw[1]}; LLM graphs: Qwen2.5-1.5B widths, 2 layers.",
             "", "| unit | lint | errors | warnings | operators |", "|---|---|---|---|---|"]
    for name, r in report["units"].items():
        errors = sum(f["severity"] == "error" for f in r["findings"])
        warnings = sum(f["severity"] == "warning" for f in r["findings"])
        lines.append(f"| {name} | {'ok' if r['ok'] else 'FAIL'} | {errors} | {warnings} | {len(r['op_counts'])} |")
    (out / "lint_edge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
