"""`vidllm-edge quantize-llm`: INT8 / INT4 (RTN or AWQ) weight-only quantization of a checkpoint's LLM.

    vidllm-edge quantize-llm --checkpoint DIR --bits 8|4 [--method rtn|awq] --out DIR

``--checkpoint`` is our save_pretrained folder (the LLM part is read, nothing else is built) or a
Hugging Face LLaMA/Qwen2 folder. The result, ``DIR/llm.<recipe>.safetensors``, is what
`vidllm_edge.runtime.fast_decoder.FastDecoder.from_hf(..., quantized=PATH)` loads. After quantizing, a
parity line compares the quantized and the unquantized model on a held-out prompt (teacher forcing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vidllm_edge.errors import CheckpointError, InputError
from vidllm_edge.models import quant

DEFAULT_METHOD = "awq"
DEFAULT_CALIB_PROMPTS = 16
DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "float32"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Calibration text (AWQ only needs activation magnitudes per channel; a few varied prompts suffice).
CALIBRATION_TEXTS = (
    "The living room has a grey sofa facing a wooden table, with a tall lamp in the corner near the window.",
    "Where is the red chair? It is about two meters to the left of the door, next to a small bookshelf.",
    "Describe the kitchen: white cabinets line the wall above the counter, and a kettle sits by the sink.",
    "How many plants are on the windowsill? There are three, the largest one in a blue ceramic pot.",
    "The bedroom is narrow; the bed is pushed against the far wall and a desk with a monitor faces it.",
    "Measure the distance from the camera to the refrigerator and report it in meters.",
    "A staircase rises along the right wall; under it there is a storage cupboard with a closed door.",
    "Which object is closest to the camera, the backpack on the floor or the chair behind it?",
    "In the office, rows of desks hold laptops and coffee cups, and a whiteboard covers the back wall.",
    "The bathroom mirror reflects a towel rail, and the shower is separated by a glass panel.",
    "Find the black box on the shelf and give its size: width, depth and height in centimetres.",
    "Summarise the scene in one sentence, then list every piece of furniture you can see.",
    "Outside the window a street with parked cars is visible; the curtains are half open.",
    "Is the door open or closed? If it is open, what can be seen through it?",
    "The corridor is lit by ceiling lights every few meters, and a fire extinguisher hangs by the exit.",
    "Count the chairs around the dining table and say whether any of them is out of place.",
    "A child's room with toys scattered on a green rug, a bunk bed and a poster of the solar system.",
    "The garage holds a bicycle, a workbench with tools, and shelves of paint cans along the wall.",
    "What colour is the couch, and is there a cushion on it? Answer briefly.",
    "The conference room table seats twelve; a projector hangs from the ceiling above it.",
)
HELD_OUT_TEXT = "The reading corner has an armchair, a floor lamp and a low shelf full of books and magazines."


def load_llm(folder: str | Path) -> tuple[nn.Module, object, str]:
    """(`transformers` LLM in float32 on the CPU, tokenizer, description) from our checkpoint or an HF folder.

    Our checkpoint: only the ``llm.*`` tensors are read (meta build, strict keys). Raises CheckpointError.
    """
    from vidllm_edge.models.llm import build_llm
    from vidllm_edge.models.tokenizer import load_tokenizer

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"Checkpoint folder: {folder}", "has no config.json.",
                              "Pass a folder written by save_pretrained, or a Hugging Face LLaMA/Qwen2 folder.")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"Checkpoint config: {config_path}", f"is not valid JSON ({exc}).",
                              "Re-save the checkpoint.") from exc
    if "llm" in data:  # ours
        return _load_our_llm(folder, data), load_tokenizer(folder), f"{folder} (vidllm-edge checkpoint, LLM part)"
    from vidllm_edge.models.config import LLMConfig

    llm = build_llm(LLMConfig(path=str(folder)))
    return llm, load_tokenizer(folder), f"{folder} (Hugging Face folder)"


def _load_our_llm(folder: Path, data: dict) -> nn.Module:
    from safetensors import safe_open

    from vidllm_edge.models import checkpoint as ckpt
    from vidllm_edge.models.config import VidLLMConfig
    from vidllm_edge.models.llm import build_llm, materialize_rotary
    from vidllm_edge.models.model import WEIGHTS_NAME

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"Checkpoint folder: {folder}", f"has no {WEIGHTS_NAME}.",
                              "Pass a folder written by save_pretrained.")
    cfg = VidLLMConfig.from_dict(data)
    ckpt._check_safetensors_header(path)
    state = {}
    with safe_open(str(path), framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
        for key in fh.keys():
            if key.startswith("llm."):
                state[key[4:]] = fh.get_tensor(key)
    for alias, key in aliases.items():
        if alias.startswith("llm.") and key.startswith("llm.") and key[4:] in state:
            state[alias[4:]] = state[key[4:]]
    llm = ckpt.build_on_meta(lambda: build_llm(cfg.llm))
    ckpt.load_into(llm, state, f"Checkpoint: {path} (llm.*)", "The LLM weights do not fit config.json.")
    materialize_rotary(llm)
    if any(a.startswith("llm.") for a in aliases):
        llm.tie_weights()
    ckpt.assert_materialized(llm, f"Checkpoint: {folder} (LLM)")
    return llm.eval()


def quantize_llm(llm: nn.Module, tokenizer, out: str | Path, bits: int, method: str = DEFAULT_METHOD,
                 group: int = quant.DEFAULT_GROUP, calib_prompts: int = DEFAULT_CALIB_PROMPTS,
                 device: str = DEFAULT_DEVICE, dtype: torch.dtype = torch.float32,
                 log: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Quantize ``llm`` and write ``out/llm.<recipe>.safetensors``; returns (path, report with parity numbers).

    Args:
        bits: 8 or 4; method: "rtn" or "awq"; group: INT4 group size; calib_prompts: AWQ prompts (<= 20 built in).
        device/dtype: where and in which dtype the conversion and calibration run (and the file's dtype).
    """
    from vidllm_edge import atomic
    from vidllm_edge.models.fast_llm import FastLLM, teacher_forced_logits

    log = log or (lambda _msg: None)
    if not 1 <= calib_prompts <= len(CALIBRATION_TEXTS):
        raise InputError(f"Calibration prompts: {calib_prompts}", f"must be between 1 and {len(CALIBRATION_TEXTS)}.",
                         "Pass --calib-prompts N within that range.")
    atomic.ensure_dir(out, "Quantized LLM folder")  # fail before any compute
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"Device: {device}", "is not available (torch sees no CUDA GPU).", "Use --device cpu.")
    fast = FastLLM.from_hf(llm, dtype=dtype, device=device, max_seq=512)
    held_out = tokenizer(HELD_OUT_TEXT, add_special_tokens=False)["input_ids"]
    ref = teacher_forced_logits(fast, held_out, 4)
    calibration = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in CALIBRATION_TEXTS[:calib_prompts]]
    report = quant.quantize_fast_llm(fast, bits, method, group, calibration=calibration, log=log)
    got = teacher_forced_logits(fast, held_out, 4)
    report["parity"] = {"held_out_tokens": len(held_out),
                        "logit_cosine_mean": float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean()),
                        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                        "max_abs": float((got - ref).abs().max())}
    path = quant.save_quantized(fast, out)
    report["path"], report["bytes"] = str(path), path.stat().st_size
    return path, report


def add_quantize_llm_parser(sub) -> argparse.ArgumentParser:
    """Register ``quantize-llm`` on an argparse sub-parsers object (defaults live in this module)."""
    p = sub.add_parser("quantize-llm", help="INT8/INT4 weight-only quantization of the LLM for the fast decoder")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a folder written by save_pretrained, or a Hugging Face LLaMA/Qwen2 folder")
    p.add_argument("--bits", type=int, required=True, choices=list(quant.BITS))
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(quant.METHODS),
                   help=f"rtn (round to nearest) or awq (activation-aware scales; default {DEFAULT_METHOD})")
    p.add_argument("--group-size", type=int, default=quant.DEFAULT_GROUP,
                   help=f"INT4 group size along the input dimension (default {quant.DEFAULT_GROUP})")
    p.add_argument("--calib-prompts", type=int, default=DEFAULT_CALIB_PROMPTS,
                   help=f"AWQ calibration prompts from the built-in set (default {DEFAULT_CALIB_PROMPTS})")
    p.add_argument("--device", default=DEFAULT_DEVICE, help=f"cpu or cuda (default {DEFAULT_DEVICE})")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=sorted(_DTYPES),
                   help=f"dtype of the unquantized tensors and of calibration (default {DEFAULT_DTYPE})")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def cmd_quantize_llm(args) -> int:
    """CLI entry: quantize, write the file, print per-layer progress, the parity line and the file."""
    start = time.perf_counter()
    llm, tokenizer, name = load_llm(args.checkpoint)
    print(f"quantizing {name}: {quant.recipe_name(args.bits, args.method, args.group_size)} on {args.device}", flush=True)
    path, report = quantize_llm(llm, tokenizer, args.out, args.bits, args.method, args.group_size, args.calib_prompts,
                                args.device, _DTYPES[args.dtype], log=lambda msg: print(f"  {msg}", flush=True))
    par = report["parity"]
    print(f"parity vs unquantized ({par['held_out_tokens']} held-out tokens, teacher forcing): logit cosine "
          f"{par['logit_cosine_mean']:.5f}, top-1 agreement {par['top1_agreement']:.3f}, max-abs {par['max_abs']:.3g}")
    print(f"wrote {path} ({report['bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0
