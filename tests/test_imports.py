"""Every module imports on a machine without the heavy optional packages (STYLE.md)."""

from __future__ import annotations

import subprocess
import sys

MASKED = ["tensorrt", "onnxruntime", "onnx", "onnxscript", "cuda", "modelopt", "pycuda"]

SCRIPT = f"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {MASKED!r}:
            raise ImportError(f'masked for the test: {{name}}')
        return None
sys.meta_path.insert(0, Block())
import vidllm_edge
names = ['vidllm_edge']
for sub in ('models', 'export', 'calibration', 'engines', 'runtime', 'benchmarks'):
    pkg = importlib.import_module('vidllm_edge.' + sub)
    names += ['vidllm_edge.' + sub] + [f'vidllm_edge.{{sub}}.{{m.name}}' for m in pkgutil.iter_modules(pkg.__path__)]
names += ['vidllm_edge.' + m.name for m in pkgutil.iter_modules(vidllm_edge.__path__)]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_every_module_imports_without_optional_packages():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 30


def test_require_names_the_package_and_the_fix():
    import pytest

    from vidllm_edge.errors import DependencyError
    from vidllm_edge.optional import require

    with pytest.raises(DependencyError, match=r"^Python package: surely_not_installed_pkg \| cannot be imported .*"
                                              r"needed for the test\.\nNote: pip install surely_not_installed_pkg"):
        require("surely_not_installed_pkg", "the test")
