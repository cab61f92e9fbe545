"""LLM export (prefill + decode graphs with a KV cache) and the ONNX Runtime decoder against the torch
reference, for a Qwen2-shaped and a LLaMA-shaped tiny model, both with grouped-query attention."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from vidllm_edge.errors import CheckpointError  # noqa: E402
from vidllm_edge.export import llm as export_module  # noqa: E402
from vidllm_edge.export.llm import LLMStep, export_llm, validate_llm_graph  # noqa: E402
from vidllm_edge.models.config import LLMConfig  # noqa: E402
from vidllm_edge.models.llm import (LLM_DECODE_FILE, LLM_EMBED_FILE, LLM_PREFILL_FILE, BoxHead,  # noqa: E402
                                    GenerationConfig, ReferenceDecoder, build_llm)
from vidllm_edge.models.tokenizer import tiny_tokenizer  # noqa: E402
from vidllm_edge.runtime.ort_llm import OrtDecoder  # noqa: E402

FILES = (LLM_PREFILL_FILE, LLM_DECODE_FILE, LLM_EMBED_FILE)
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0)
FAMILIES = {"qwen2": dict(SHAPE, model_type="qwen2", tie_word_embeddings=True),  # q/k/v biases, tied head
            "llama": dict(SHAPE, model_type="llama", tie_word_embeddings=False)}


class Family:
    """One exported tiny model with both decoders over it."""

    def __init__(self, name: str, folder) -> None:
        torch.manual_seed(0)
        self.cfg = LLMConfig(hf_config=FAMILIES[name], box_head_hidden=16)
        self.llm = build_llm(self.cfg)
        with torch.no_grad():  # larger weights than the default init give real logit margins
            for p in self.llm.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.35)
        assert self.llm.config.num_key_value_heads < self.llm.config.num_attention_heads  # GQA is exercised
        self.folder = folder
        self.paths = export_llm(self.llm, folder)
        self.tok = tiny_tokenizer()
        self.head = BoxHead(64, 16).eval()
        self.ref = ReferenceDecoder(self.llm, self.tok, self.head, self.cfg)
        self.ort = OrtDecoder(folder, self.tok, self.cfg, box_fn=self.head)
        self.ref.eos_ids = self.ort.eos_ids = set()  # random weights: compare a fixed number of tokens


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def _answer(decoder, question: str, n: int = 32):
    return [a for _, a in decoder.stream(question, GenerationConfig(max_new_tokens=n)) if a is not None][0]


def _close(ref: torch.Tensor, got: torch.Tensor, tol: float = 1e-4) -> tuple[float, float]:
    """Max-abs and relative L2 of got vs ref; both must be within ``tol``."""
    ref, got = ref.detach().float().cpu(), got.detach().float().cpu()
    max_abs = float((ref - got).abs().max())
    rel_l2 = float((ref - got).norm() / ref.norm().clamp_min(1e-12))
    assert max_abs <= tol and rel_l2 <= tol, f"max-abs {max_abs:.3g}, rel-L2 {rel_l2:.3g} over {tol}"
    return max_abs, rel_l2


def test_export_writes_the_three_artifacts(fam):
    assert sorted(p.name for p in fam.paths.values()) == sorted(FILES)
    assert sorted(p.name for p in fam.folder.iterdir()) == sorted(FILES)  # no temp files or data files left
    table = fam.ort.embed([3, 7])
    np.testing.assert_array_equal(table.numpy(), fam.ref.embed([3, 7]).detach().numpy())


def test_greedy_tokens_match_reference_and_prefix_is_reused(fam):
    torch.manual_seed(1)
    visual = torch.randn(7, 64)
    fam.ref.prefill_prefix(visual)
    fam.ort.prefill_prefix(visual)
    assert fam.ort.prefix_len == fam.ref.prefix_len == fam.ref.cache.get_seq_length()
    for question in ("Where is the red chair?", "How many boxes?", "Where is the red chair?"):
        want, got = _answer(fam.ref, question), _answer(fam.ort, question)
        assert len(want.token_ids) == 32
        assert got.token_ids == want.token_ids, question
        assert got.text == want.text
        assert fam.ort._seq_len() == fam.ort.prefix_len  # cropped back to the prefix


def test_io_binding_path_matches_on_cpu(fam):
    dec = OrtDecoder(fam.folder, fam.tok, fam.cfg, box_fn=fam.head, io_binding=True)
    dec.eos_ids = set()
    visual = torch.randn(5, 64)
    fam.ref.prefill_prefix(visual)
    dec.prefill_prefix(visual)
    for question in ("Describe the room.", "Is there a lamp?"):
        assert _answer(dec, question, 16).token_ids == _answer(fam.ref, question, 16).token_ids
    dec._forward(dec.embed([5, 6, 7]))  # a general crop (not to the prefix) goes through the host
    dec._crop(dec.prefix_len + 1)
    assert dec._seq_len() == dec.prefix_len + 1 and dec._past[0].shape()[2] == dec.prefix_len + 1


@torch.inference_mode()
def test_prefill_logits_parity_fp32(fam):
    torch.manual_seed(2)
    embeds = torch.cat([fam.ref.embed(fam.ref.parts.prefix_ids), torch.randn(1, 9, 64)], dim=1)
    fam.ref._reset()
    fam.ort._reset()
    (ref_logits, ref_hidden), (logits, hidden) = fam.ref._forward(embeds), fam.ort._forward(embeds)
    _close(ref_logits, logits)
    _close(ref_hidden, hidden)
    assert fam.ort._box(hidden) == pytest.approx(fam.ref._box(ref_hidden), abs=1e-4)
    question = fam.ref.embed([40, 41, 42, 43])  # the question chunk: decode graph with T > 1
    _close(fam.ref._forward(question)[0], fam.ort._forward(question)[0])


@torch.inference_mode()
@pytest.mark.parametrize("prefill_len", [2, 11])
def test_dynamic_tokens_and_past(fam, prefill_len):
    torch.manual_seed(prefill_len)
    fam.ref._reset()
    fam.ort._reset()
    for tokens in (prefill_len, 1, 6, 1):  # prefill, then decode at past = T, T+1, T+7
        embeds = torch.randn(1, tokens, 64)
        ref_logits, ort_logits = fam.ref._forward(embeds)[0], fam.ort._forward(embeds)[0]
        _close(ref_logits, ort_logits)
    assert fam.ort._seq_len() == fam.ref.cache.get_seq_length() == prefill_len + 8
    fam.ref._crop(prefill_len + 3)  # a crop to a length that is not the prefix: slices the arrays
    fam.ort._crop(prefill_len + 3)
    embeds = torch.randn(1, 2, 64)
    _close(fam.ref._forward(embeds)[0], fam.ort._forward(embeds)[0])


def test_large_weights_go_to_one_external_data_file(fam, tmp_path, monkeypatch):
    if fam.cfg.hf_config["model_type"] != "qwen2":
        pytest.skip("the file layout does not depend on the family; one export suffices")
    monkeypatch.setattr(export_module, "_EXTERNAL_DATA_BYTES", 0)  # as if the weights were over 2 GB
    step = LLMStep(fam.llm).eval()
    path = export_module._export_graph(step, tmp_path, LLM_PREFILL_FILE, with_past=False, opset=18)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LLM_PREFILL_FILE, LLM_PREFILL_FILE + ".data"]
    weight_bytes = sum(p.numel() * p.element_size() for p in fam.llm.parameters())
    assert (tmp_path / (LLM_PREFILL_FILE + ".data")).stat().st_size >= 0.9 * weight_bytes  # tiny ones stay inline
    validate_llm_graph(step, path, with_past=False, tokens=4, past=0)  # loads from the data file, same values


@pytest.mark.parametrize("broken", FILES)
@pytest.mark.parametrize("how", ["missing", "corrupted"])
def test_bad_artifact_is_named(fam, tmp_path, broken, how):
    for name in FILES:
        if name != broken:
            shutil.copy(fam.folder / name, tmp_path / name)
        elif how == "corrupted":
            (tmp_path / name).write_bytes((fam.folder / name).read_bytes()[:300])  # truncated
    with pytest.raises(CheckpointError, match=rf"^LLM (artifact|graph): .*{broken} \| .*\nNote: .*vidllm-edge export"):
        OrtDecoder(tmp_path, fam.tok, fam.cfg, box_fn=fam.head)


def test_modules_import_without_onnx_packages():
    code = ("import sys\n"
            "for m in ('onnx', 'onnxruntime', 'onnxscript'): sys.modules[m] = None\n"
            "import vidllm_edge.export.llm, vidllm_edge.runtime.ort_llm as r\n"
            "from vidllm_edge.errors import DependencyError\n"
            "try:\n    r.OrtDecoder('.', None, None, box_fn=None)\nexcept DependencyError as e:\n    print('ok', e.subject)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok Python package: onnxruntime")
