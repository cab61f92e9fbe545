"""vidllm_edge.export (see DESIGN.md §2)."""
