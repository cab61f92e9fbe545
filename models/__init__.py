"""Reference PyTorch modules, config presets and checkpoint loading (DESIGN.md §1-2)."""

_LAZY = {"VGGT": "vidllm_edge.models.vggt", "load_vggt": "vidllm_edge.models.vggt"}


def __getattr__(name: str):
    """Lazily expose heavy entry points (``vidllm_edge.models.load_vggt``) without importing them here."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
