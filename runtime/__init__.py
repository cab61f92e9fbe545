"""Backends, video sources, the pipeline and the CLI (DESIGN.md §5, §7)."""
