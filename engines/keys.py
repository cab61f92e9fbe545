"""What invalidates a TensorRT engine (DESIGN.md §6), as a key, a file name and a check.

An engine only deserialises on the TensorRT version and GPU architecture it was built with, and it only
matches the ONNX graph it was built from. :class:`EngineKey` carries all of that plus the unit, the
precision, the shape profile and the image size; its file name encodes them
(``geometry.fp16.S1-8-32.518x518.trt10.3.sm87.<sha12>.engine``, the clip_trt / NanoLLM habit) and its
dict goes into ``engines.json``. :func:`check_engine` compares a manifest entry against what is installed
*before* anything is deserialised, so a JetPack or GPU change yields :class:`EngineMismatchError` naming
each differing field and the rebuild command, never TensorRT's opaque deserialisation error.

Pure Python: no tensorrt, torch or onnx import, so the runtime and the tests use it anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from packaging.version import InvalidVersion, Version

from vidllm_edge.errors import ConfigError, InputError, VidLLMError

PRECISIONS = ("fp16", "int8", "best")  # what `vidllm-edge build --precision` accepts
ENGINE_PRECISIONS = ("fp16", "int8")  # what one engine is built as ("best" resolves to one of these)
FRAME_SYMBOLS = ("S", "Sm")  # dynamic symbols that --frames governs
DYNAMIC_SYMBOLS = ("S", "Sm", "M", "N")  # canonical order in names and messages
SUFFIX = ".engine"
HASH_CHARS = 12  # of the ONNX sha256, in file names

Range = tuple[int, int, int]


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. ``profile``: dynamic symbol -> (min, opt, max); ``compute_capability``
    as ``"8.7"``; ``onnx_sha256``: digest of the graph the engine was built from (see :func:`onnx_digest`)."""

    unit: str
    precision: str
    profile: tuple[tuple[str, Range], ...]
    image_hw: tuple[int, int]
    trt_version: str
    compute_capability: str
    onnx_sha256: str

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise InputError(f"Engine precision: {self.precision}", f"is not one of {ENGINE_PRECISIONS}.",
                             "'best' is resolved by the builder into fp16 or int8 before a key is made.")
        items = self.profile.items() if isinstance(self.profile, Mapping) else self.profile
        profile = tuple(sorted(((str(s), _check_range(s, r)) for s, r in items), key=lambda kv: _symbol_order(kv[0])))
        object.__setattr__(self, "profile", profile)
        object.__setattr__(self, "image_hw", (int(self.image_hw[0]), int(self.image_hw[1])))
        object.__setattr__(self, "compute_capability", format_cc(self.compute_capability))
        _parse_version(self.trt_version, "TensorRT version")

    @property
    def profile_dict(self) -> dict[str, Range]:
        return dict(self.profile)

    def file_name(self) -> str:
        """``<unit>.<precision>.<profile>.<H>x<W>.trt<major.minor>.sm<XY>.<sha12>.engine``."""
        prof = "_".join(f"{s}{a}-{b}-{c}" for s, (a, b, c) in self.profile) or "static"
        h, w = self.image_hw
        return (f"{self.unit}.{self.precision}.{prof}.{h}x{w}.{trt_tag(self.trt_version)}."
                f"{sm_tag(self.compute_capability)}.{self.onnx_sha256[:HASH_CHARS]}{SUFFIX}")

    def to_dict(self) -> dict[str, Any]:
        """The key part of an ``engines.json`` entry (JSON types only)."""
        return {"unit": self.unit, "precision": self.precision,
                "profile": {s: list(r) for s, r in self.profile}, "image_hw": list(self.image_hw),
                "trt_version": self.trt_version, "compute_capability": self.compute_capability,
                "onnx_sha256": self.onnx_sha256, "file": self.file_name()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EngineKey":
        return cls(d["unit"], d["precision"], {s: tuple(r) for s, r in d["profile"].items()}, tuple(d["image_hw"]),
                   d["trt_version"], d["compute_capability"], d["onnx_sha256"])


def _symbol_order(sym: str) -> tuple[int, str]:
    return (DYNAMIC_SYMBOLS.index(sym) if sym in DYNAMIC_SYMBOLS else len(DYNAMIC_SYMBOLS), sym)


def _check_range(sym: str, r: Sequence[int]) -> Range:
    lo, opt, hi = (int(v) for v in r)
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"Profile: {sym}", f"has min/opt/max {lo}/{opt}/{hi}.", "Need 1 <= min <= opt <= max.")
    return lo, opt, hi


def _parse_version(text: str, what: str) -> Version:
    try:
        return Version(str(text))
    except InvalidVersion:
        raise ConfigError(f"{what}: {text!r}", "is not a version number.", "Expected e.g. 10.3.0.") from None


def trt_tag(version: str) -> str:
    """``"10.3.0.30"`` -> ``"trt10.3"`` (the file name; the manifest keeps the full version)."""
    v = _parse_version(version, "TensorRT version")
    return f"trt{v.major}.{v.minor}"


def format_cc(cc: str | Sequence[int]) -> str:
    """``(8, 7)`` or ``"8.7"`` -> ``"8.7"``."""
    if isinstance(cc, str):
        parts = cc.split(".")
    else:
        parts = [str(v) for v in cc]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"GPU compute capability: {cc!r}", "is not MAJOR.MINOR.", "Expected e.g. 8.7 (Orin).")
    return f"{int(parts[0])}.{int(parts[1])}"


def sm_tag(cc: str | Sequence[int]) -> str:
    """``"8.7"`` -> ``"sm87"``."""
    return "sm" + format_cc(cc).replace(".", "")


def onnx_digest(file_digests: Mapping[str, str]) -> str:
    """The ONNX identity of a unit: the graph file's sha256 when it is one file (what ``sha256sum`` prints);
    with external weights, the sha256 of the sorted ``name:digest`` lines, so a weights change counts too."""
    if len(file_digests) == 1:
        return next(iter(file_digests.values()))
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(file_digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# -- profiles ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitProfile:
    """One unit's optimization profile: symbol ranges, per-input min/opt/max shapes, and where the build
    goes beyond the range the export was validated at (allowed, recorded and printed; not refused)."""

    symbols: dict[str, Range]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    validated: dict[str, Range]
    beyond_export: tuple[str, ...] = ()

    def beyond_dict(self) -> dict[str, dict[str, list[int]]]:
        return {s: {"built": list(self.symbols[s]), "validated": list(self.validated[s])}
                for s in self.beyond_export}


def as_range(frames: Any) -> Range | None:
    """``(min, opt, max)``, an object with ``.min/.opt/.max`` (FrameProfile), or None."""
    if frames is None:
        return None
    if all(hasattr(frames, a) for a in ("min", "opt", "max")):
        frames = (frames.min, frames.opt, frames.max)
    return _check_range("frames", frames)


def fixed_dims(manifest: Mapping[str, Any]) -> dict[str, int]:
    """Values of the fixed symbols (H, W, P, C, D) and the metric-depth frame cap from an export manifest.

    Symbols the manifest cannot tell (e.g. D when the LLM came from a local folder and llm_decode was not
    exported) are left out; the builder reads those from the ONNX graph itself.
    """
    h, w = (int(v) for v in manifest["image_hw"])
    dims: dict[str, int] = {"H": h, "W": w}
    cfg = manifest.get("config") or {}
    agg = (cfg.get("vggt") or {}).get("aggregator") or {}
    if "patch_size" in agg:
        p = int(agg["patch_size"])
        dims["P"] = (h // p) * (w // p)
    if "embed_dim" in agg:
        dims["C"] = int(agg["embed_dim"])
    llm = ((manifest.get("units") or {}).get("llm_decode") or {}).get("llm") or {}
    hf = ((cfg.get("llm") or {}).get("hf_config")) or {}
    if "hidden_size" in llm:
        dims["D"] = int(llm["hidden_size"])
    elif "hidden_size" in hf:
        dims["D"] = int(hf["hidden_size"])
    md = (cfg.get("metric_depth") or {}).get("max_frames")
    if md is not None:
        dims["Sm_cap"] = int(md)
    return dims


def profiles_from_manifest(unit_entry: Mapping[str, Any], frames: Any, image_hw: Sequence[int],
                           dims: Mapping[str, int] | None = None,
                           metric_frames_cap: int | None = None) -> UnitProfile:
    """Per-input min/opt/max shapes of one exported unit.

    Args:
        unit_entry: the unit's entry of the export manifest (``inputs`` with symbolic shapes, ``dynamic``,
            ``profile`` {symbol: [min, opt, max]} = the range the export was validated at).
        frames: (min, opt, max) frame counts for ``S`` (and ``Sm``, capped at ``metric_frames_cap``), or None
            for the export's own ranges. ``M`` and ``N`` always keep the export's ranges.
        image_hw: (H, W) in pixels, the export's image size (fixes H and W).
        dims: values of the other fixed symbols (P, C, D), e.g. from :func:`fixed_dims`.
        metric_frames_cap: the most metric-depth frames the model runs (cfg.metric_depth.max_frames).

    A frames range wider than the export was validated at is allowed; it is listed in ``beyond_export``.
    """
    frames = as_range(frames)
    h, w = (int(v) for v in image_hw)
    if h <= 0 or w <= 0:
        raise InputError(f"Image size: {h}x{w}", "must be positive.", "Use the export's image_hw.")
    known = {k: int(v) for k, v in (dims or {}).items()}
    known.update(H=h, W=w)
    dynamic = list(unit_entry.get("dynamic") or {})
    validated = {s: _check_range(s, r) for s, r in (unit_entry.get("profile") or {}).items()}
    symbols: dict[str, Range] = {}
    for sym in dynamic:
        if sym not in validated:
            raise ConfigError(f"Export manifest unit: {unit_entry.get('file', '?')}",
                              f"declares {sym} dynamic but has no profile for it.", "Export again.")
        if frames is not None and sym in FRAME_SYMBOLS:
            cap = metric_frames_cap if sym == "Sm" and metric_frames_cap else None
            symbols[sym] = tuple(min(v, cap) for v in frames) if cap else frames  # type: ignore[assignment]
        else:
            symbols[sym] = validated[sym]
    shapes = {}
    for spec in unit_entry["inputs"]:
        per = []
        for i in range(3):
            shape = []
            for d in spec["shape"]:
                if isinstance(d, int):
                    shape.append(d)
                elif d in symbols:
                    shape.append(symbols[d][i])
                elif d in known:
                    shape.append(known[d])
                else:
                    raise ConfigError(f"Input tensor: {spec['name']}", f"has the symbol {d} whose size is unknown.",
                                      f"Pass dims with {d} (known: {sorted(known)}).")
            per.append(tuple(shape))
        shapes[spec["name"]] = tuple(per)
    beyond = tuple(s for s in symbols if symbols[s][0] < validated[s][0] or symbols[s][2] > validated[s][2])
    return UnitProfile(symbols, shapes, {s: validated[s] for s in symbols}, beyond)


# -- checks ------------------------------------------------------------------------------------------


class Difference(NamedTuple):
    """One field an engine was built with that differs from what is here now."""

    field: str
    built: str
    installed: str


_FIELD_TEXT = {
    "trt_version": lambda b, i: f"TensorRT version: built with {b}, installed {i}",
    "compute_capability": lambda b, i: (f"GPU compute capability: built for {sm_tag(b)} ({b}), "
                                        f"this GPU is {sm_tag(i)} ({i})"),
    "onnx_sha256": lambda b, i: f"ONNX sha256: built from {b[:12]}…, the export now has {i[:12]}…",
}


def check_engine(entry: Mapping[str, Any], installed_trt: str | None, gpu_cc: str | Sequence[int] | None,
                 onnx_sha: str | None) -> list[Difference]:
    """Fields of an ``engines.json`` entry that differ from what is installed (empty: the engine fits).

    Versions compare with ``packaging.version`` (10.10 > 10.9; 10.3 == 10.3.0). An argument given as None is
    not checked (e.g. no export folder at hand for the ONNX hash).
    """
    diffs = []
    if installed_trt is not None:
        built = _parse_version(entry["trt_version"], "Engine TensorRT version")
        if built != _parse_version(installed_trt, "Installed TensorRT version"):
            diffs.append(Difference("trt_version", str(entry["trt_version"]), str(installed_trt)))
    if gpu_cc is not None and format_cc(entry["compute_capability"]) != format_cc(gpu_cc):
        diffs.append(Difference("compute_capability", format_cc(entry["compute_capability"]), format_cc(gpu_cc)))
    if onnx_sha is not None and entry["onnx_sha256"] != onnx_sha:
        diffs.append(Difference("onnx_sha256", entry["onnx_sha256"], onnx_sha))
    return diffs


def rebuild_command(export_dir: Any, precision: str, frames: Any, out_dir: Any) -> str:
    """The exact `vidllm-edge build` command line that rebuilds an engines folder."""
    a, b, c = as_range(frames) or (0, 0, 0)
    frames_arg = f" --frames {a}:{b}:{c}" if a else ""
    return f"vidllm-edge build --export {export_dir} --precision {precision}{frames_arg} --out {out_dir}"


def entry_rebuild_command(entry: Mapping[str, Any], engines_dir: Any) -> str:
    """The rebuild command recorded with an engine (its export folder, requested precision and frames)."""
    build = entry.get("build") or {}
    return rebuild_command(build.get("export", "EXPORT_DIR"), build.get("precision", entry.get("precision", "fp16")),
                           build.get("frames"), engines_dir)


class EngineMismatchError(VidLLMError):
    """An engine was built for another TensorRT, GPU or ONNX graph than the one here; names each difference
    (built vs installed) and the command that rebuilds it."""

    def __init__(self, engine: Any, differences: Sequence[Difference], command: str) -> None:
        self.differences = list(differences)
        self.command = command
        what = "; ".join(_FIELD_TEXT[d.field](d.built, d.installed) for d in self.differences)
        super().__init__(f"Engine: {engine}", f"was built for another setup: {what}.",
                         "TensorRT engines only load on the TensorRT version and GPU architecture they were built "
                         f"with, from the same ONNX graph. Rebuild: {command}")
