"""vidllm-edge: Vid-LLM (video -> metric 3D -> answers) compiled for Jetson and desktop GPUs.

The subpackages (`models`, `export`, `calibration`, `engines`, `runtime`, `benchmarks`) live in the
repository's top-level folders and are mapped here by pyproject.toml. This module imports nothing heavy.
"""

__version__ = "0.1.0"
