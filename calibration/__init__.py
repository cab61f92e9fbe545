"""vidllm_edge.calibration (see DESIGN.md §2)."""
