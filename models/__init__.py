"""Reference PyTorch modules, config presets and checkpoint loading (DESIGN.md §1-2)."""
