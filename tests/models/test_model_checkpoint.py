"""Our checkpoint format round-trips exactly; local Hugging Face folders load; bad folders are named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidllm_edge.errors import CheckpointError
from vidllm_edge.models.config import from_name
from vidllm_edge.models.model import build_model, from_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_model("tiny", seed=0)
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    return model, folder


def test_round_trip_is_exact(saved):
    model, folder = saved
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
    loaded = from_pretrained(folder)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert loaded.llm.get_input_embeddings().weight.data_ptr() == loaded.llm.get_output_embeddings().weight.data_ptr()
    assert loaded.tokenizer("Where is the <loc>?")["input_ids"] == model.tokenizer("Where is the <loc>?")["input_ids"]
    assert loaded.cfg.to_dict() == model.portable_config().to_dict()


def test_loading_does_not_random_init(saved, monkeypatch):
    _, folder = saved
    calls, meta_calls = [], []

    def spy(name):
        real = getattr(torch.nn.init, name)

        def init(tensor, *args, **kwargs):
            (meta_calls if tensor.is_meta else calls).append(name)
            return real(tensor, *args, **kwargs)
        return init

    for name in ("normal_", "trunc_normal_", "kaiming_uniform_", "uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, spy(name))
    from_pretrained(folder)
    assert meta_calls  # the spy works: module constructors do call init, on meta tensors
    assert calls == []  # no real tensor is ever initialised: weights are assigned from the file


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_missing_unexpected_and_misshaped_keys_are_all_listed(saved, tmp_path):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    state = load_file(str(dst / "model.safetensors"))
    meta = {"format": "vidllm-edge", "version": "1", "aliases": json.dumps({"llm.lm_head.weight": "llm.model.embed_tokens.weight"})}
    del state["box_head.fc2.bias"]
    state["adapter.extra_weight"] = torch.zeros(2)
    state["projector.fc1.weight"] = torch.zeros(3, 3)
    save_file(state, str(dst / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(dst)
    text = str(err.value)
    assert text.startswith(f"Checkpoint: {dst / 'model.safetensors'} | does not match the model:")
    assert "1 missing key(s): box_head.fc2.bias" in text
    assert "1 unexpected key(s): adapter.extra_weight" in text
    assert "1 mis-shaped key(s): projector.fc1.weight (checkpoint [3, 3], model [" in text
    assert "\nNote: " in text


def test_truncated_safetensors_is_named(saved, tmp_path):
    _, folder = saved
    dst = _copy(folder, tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors \| is truncated: tensors need \d+ bytes, the file has \d+"):
        from_pretrained(dst)


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist or is not a folder"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        from_pretrained(tmp_path)


def test_hugging_face_llm_folder_loads_weights_and_tokenizer(tmp_path):
    """An LLM (LLaMA family here) and its tokenizer from a local save_pretrained folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vidllm_edge.models.tokenizer import tiny_tokenizer

    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    hf.save_pretrained(tmp_path / "llm")
    tiny_tokenizer().save_pretrained(str(tmp_path / "llm"))
    cfg = from_name("tiny")
    cfg.llm.path, cfg.llm.hf_config = str(tmp_path / "llm"), None
    model = build_model(cfg, seed=0)
    assert model.llm.config.model_type == "llama"
    assert torch.equal(model.llm.model.layers[1].mlp.down_proj.weight, hf.model.layers[1].mlp.down_proj.weight)
    model.save_pretrained(tmp_path / "ours")  # the checkpoint then holds the LLM itself
    loaded = from_pretrained(tmp_path / "ours")
    assert loaded.cfg.llm.path is None and loaded.cfg.llm.hf_config["model_type"] == "llama"
    assert torch.equal(loaded.llm.lm_head.weight, hf.lm_head.weight)
