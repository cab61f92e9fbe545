"""vidllm_edge.engines (see DESIGN.md §2)."""
