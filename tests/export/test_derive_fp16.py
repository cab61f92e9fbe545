"""An FP16 export folder derived from an FP32 one equals a traced FP16 export, and refuses bad folders."""

from __future__ import annotations

import numpy as np
import pytest

from vidllm_edge import manifest as M
from vidllm_edge.errors import InputError, OutputError
from vidllm_edge.export.exporter import FrameProfile, derive_fp16, export_model
from vidllm_edge.models.model import build_model

UNITS = ("perception", "geometry")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model = build_model("tiny", seed=0)
    root = tmp_path_factory.mktemp("exports")
    frames = FrameProfile(1, 2, 4)
    export_model(model, root / "fp32", "fp32", frames, units=UNITS, validate=False)
    export_model(model, root / "fp16", "fp16", frames, units=UNITS, validate=False)
    derive_fp16(root / "fp32", root / "derived")
    return root


def test_derived_graphs_equal_traced_fp16_graphs(folders):
    import onnxruntime as ort

    derived, traced = M.read_manifest(folders / "derived"), M.read_manifest(folders / "fp16")
    assert derived["precision"] == "fp16" and derived["derived_from"] == str(folders / "fp32")
    assert set(derived["units"]) == set(UNITS)
    M.verify_files(folders / "derived", derived, list(UNITS))  # hashes of the files actually written
    rng = np.random.default_rng(0)
    feeds = {"perception": {"images": rng.random((3, 3, 70, 84), dtype=np.float32)}}
    for unit in UNITS:
        a = ort.InferenceSession(str(folders / "derived" / derived["units"][unit]["file"]))
        b = ort.InferenceSession(str(folders / "fp16" / traced["units"][unit]["file"]))
        feed = feeds.get(unit) or {i.name: rng.standard_normal([3 if d == "S" else d for d in
                                                                 [3, *i.shape[1:]]]).astype(np.float32)
                                   for i in a.get_inputs()}
        for x, y in zip(a.run(None, feed), b.run(None, feed)):
            np.testing.assert_array_equal(x, y)  # the same traced program, the same conversion
    assert (folders / "derived" / "config.json").is_file()


def test_derive_refuses_an_fp16_source_and_a_non_empty_target(folders):
    with pytest.raises(InputError, match=r"Export folder: .*fp16 \| is fp16, not fp32"):
        derive_fp16(folders / "fp16", folders / "other")
    with pytest.raises(OutputError, match=r"Export folder: .*derived \| exists and is not empty"):
        derive_fp16(folders / "fp32", folders / "derived")
    assert not (folders / "other").exists()
