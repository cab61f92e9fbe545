"""vidllm_edge.benchmarks (see DESIGN.md §2)."""
