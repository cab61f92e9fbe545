"""VGGT re-implementation: golden fixture from upstream code, VGGT-1B key manifest, loader errors, shapes."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vidllm_edge.errors import CheckpointError, InputError
from vidllm_edge.models import checkpoint as ckpt
from vidllm_edge.models.config import VGGTConfig, from_name
from vidllm_edge.models.encoder import DinoEncoder
from vidllm_edge.models.vggt import VGGT, load_vggt, map_checkpoint, ours_to_upstream, to_upstream_state_dict, \
    upstream_to_ours

OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


def _oracles() -> Path:
    path = Path(__file__).resolve().parents[2].parent / "shared"
    if not path.is_dir() and os.environ.get("VIDLLM_SHARED"):
        path = Path(os.environ["VIDLLM_SHARED"])
    path = path / "oracles" / "vggt"
    if not path.is_dir():
        pytest.skip(f"the VGGT oracles folder {path} is absent (set VIDLLM_SHARED to the shared folder)")
    return path


# ------------------------------------------------------------------------------- (a) golden fixture

@pytest.fixture(scope="module")
def small():
    folder = _oracles() / "small"
    args = json.loads((folder / "config.json").read_text())["constructor_args"]
    model = load_vggt(folder / "weights.safetensors", config=args)
    io = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        enc = model.encoder(io["images"])
        geo = model.geometry(enc.tokens, tuple(io["images"].shape[-2:]), return_aggregated=True)
        preds = model(io["images"])
    return model, io, enc, geo, preds


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_small_fixture_intermediates(small):
    _, io, enc, geo, _ = small
    assert _max_abs(enc.tokens, io["patch_embed_tokens"]) <= 1e-5
    assert len(geo["aggregated_tokens"]) == 6
    for i, tok in enumerate(geo["aggregated_tokens"]):
        assert _max_abs(tok[None], io[f"aggregated_tokens.{i}"]) <= 1e-5, f"aggregated_tokens.{i}"
    for i, pose in enumerate(geo["pose_enc_list"]):
        assert _max_abs(pose[None], io[f"pose_enc_list.{i}"]) <= 1e-5, f"pose_enc_list.{i}"


def test_small_fixture_outputs(small):
    _, io, _, _, preds = small
    for key in OUTPUTS:
        ref = io[key]
        assert _max_abs(preds[key], ref) <= 1e-4, key
        torch.testing.assert_close(preds[key], ref, rtol=1e-5, atol=1e-5, msg=key)
    assert len(preds["pose_enc_list"]) == 4
    assert torch.equal(preds["images"][0], io["images"])


def test_small_fixture_from_folder_with_constructor_args(small, tmp_path):
    model, io, _, _, preds = small
    folder = _oracles() / "small"
    (tmp_path / "model.safetensors").symlink_to(folder / "weights.safetensors")
    (tmp_path / "config.json").symlink_to(folder / "config.json")  # has a constructor_args section
    loaded = load_vggt(tmp_path)
    with torch.no_grad():
        again = loaded(io["images"])
    for key in OUTPUTS:
        assert torch.equal(again[key], preds[key]), key


# ------------------------------------------------------------------------------- (b) VGGT-1B manifest

@pytest.fixture(scope="module")
def manifest():
    return json.loads((_oracles() / "vggt1b_state_dict_manifest.json").read_text())["state_dict"]


def test_vggt_1b_keys_and_shapes_match_manifest(manifest):
    model = ckpt.build_on_meta(lambda: VGGT(from_name("vggt-1b").vggt))
    ours = {ours_to_upstream(k): tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: tuple(v["shape"]) for k, v in manifest.items() if not k.startswith("track_head.")}
    assert set(ours) == set(expected), sorted(set(ours) ^ set(expected))[:20]
    assert ours == expected
    assert all(upstream_to_ours(ours_to_upstream(k)) == k for k in model.state_dict())
    track = [k for k in manifest if k.startswith("track_head.")]
    assert len(track) == 394 and all(upstream_to_ours(k) is None for k in track)
    # the whole official key set (meta tensors of the right shapes) passes the loader's strict check
    full = {k: torch.empty(v["shape"], device="meta") for k, v in manifest.items()}
    assert len(map_checkpoint(full, model, "manifest")) == len(expected)


# ------------------------------------------------------------------------------- (c) errors

def _tiny_vcfg() -> VGGTConfig:
    return from_name("tiny").vggt


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    torch.manual_seed(0)
    vcfg = _tiny_vcfg()
    model = VGGT(vcfg).eval()
    folder = tmp_path_factory.mktemp("tiny_vggt")
    save_file(to_upstream_state_dict(model.state_dict()), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"constructor_args": dataclasses.asdict(vcfg)}))
    return model, folder


def test_missing_unexpected_and_misshaped_keys_in_one_error(tiny_saved, tmp_path):
    _, folder = tiny_saved
    state = load_file(str(folder / "model.safetensors"))
    del state["camera_head.pose_branch.fc2.bias"]
    state["aggregator.extra_weight"] = torch.zeros(2)
    state["depth_head.norm.weight"] = torch.zeros(3)
    state["track_head.feature_extractor.norm.weight"] = torch.zeros(5)  # dropped, not an error
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointError) as err:
        load_vggt(bad, config=_tiny_vcfg())
    text = str(err.value)
    assert text.startswith(f"Checkpoint: {bad} | does not match the model:")
    assert "1 missing key(s): camera_head.pose_branch.fc2.bias" in text
    assert "1 unexpected key(s): aggregator.extra_weight" in text
    assert "1 mis-shaped key(s): depth_head.norm.weight (checkpoint [3], model [128])" in text
    assert "\nNote: " in text and "track_head" not in text


def test_truncated_safetensors(tiny_saved, tmp_path):
    _, folder = tiny_saved
    data = (folder / "model.safetensors").read_bytes()
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vggt(cut, config=_tiny_vcfg())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vggt(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("shape, dtype, problem", [
    ((3, 518, 518), torch.float32, "Received shape [3, 518, 518]."),
    ((2, 4, 70, 70), torch.float32, "Received shape [2, 4, 70, 70]."),
    ((2, 3, 70, 75), torch.float32, "Received shape [2, 3, 70, 75]."),
    ((1, 2, 3, 7, 14), torch.float32, "Received shape [1, 2, 3, 7, 14]."),
    ((2, 3, 70, 70), torch.uint8, "Received dtype torch.uint8."),
])
def test_bad_images_raise_input_error(tiny_saved, shape, dtype, problem):
    model, _ = tiny_saved
    with pytest.raises(InputError) as err:
        model(torch.zeros(shape, dtype=dtype))
    if "shape" in problem:
        assert str(err.value) == (f"Input tensor: images | {problem}\n"
                                  "Note: Expected [S, 3, H, W] with H, W multiples of 14.")
    else:
        assert str(err.value).startswith(f"Input tensor: images | {problem}\nNote: Expected floating-point")


# ------------------------------------------------------------------------------- (d) tiny DINO VGGT

def test_tiny_forward_shapes_and_round_trip(tiny_saved, tmp_path, monkeypatch):
    model, folder = tiny_saved
    images = torch.rand(3, 3, 56, 84)
    with torch.no_grad():
        out = model(images)
        out5 = model(images[None])
    s, h, w = 3, 56, 84
    shapes = {"pose_enc": (1, s, 9), "depth": (1, s, h, w, 1), "depth_conf": (1, s, h, w),
              "world_points": (1, s, h, w, 3), "world_points_conf": (1, s, h, w)}
    assert {k: tuple(out[k].shape) for k in shapes} == shapes
    assert [tuple(p.shape) for p in out["pose_enc_list"]] == [(1, s, 9)] * 4
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all()
    for key in shapes:
        assert torch.equal(out[key], out5[key])
    touched = []  # init calls on real (non-meta) tensors: there must be none
    for name in ("normal_", "trunc_normal_", "kaiming_uniform_", "uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, lambda t, *a, **k: touched.append(t.shape) if not t.is_meta else None)
    loaded = load_vggt(folder)  # config from the folder's constructor_args, upstream key names
    monkeypatch.undo()
    assert touched == []
    assert not loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    ours_pt = tmp_path / "ours.pt"
    torch.save(model.state_dict(), ours_pt)  # our key names, .pt
    loaded_pt = load_vggt(ours_pt, config=_tiny_vcfg())
    with torch.no_grad():
        for other in (loaded, loaded_pt):
            again = other(images)
            for key in shapes:
                assert torch.equal(again[key], out[key]), key


def test_dpt_frame_chunks_do_not_change_results(tiny_saved):
    model, _ = tiny_saved
    tokens = torch.randn(5, 12, 64)  # 5 frames of 42x56 pixels
    with torch.no_grad():
        model.geometry.dpt_chunk_size = 2
        chunked = model.geometry(tokens, (42, 56))
        model.geometry.dpt_chunk_size = None  # the export setting
        whole = model.geometry(tokens, (42, 56))
    model.geometry.dpt_chunk_size = 8
    for key in OUTPUTS:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- (e) DINO pos-embed resize

def test_dino_pos_embed_used_as_is_at_training_size():
    enc = DinoEncoder(embed_dim=8, depth=1, num_heads=2, img_size=518)
    torch.nn.init.normal_(enc.pos_embed)
    table = enc.pos_embed[:, 1:]
    assert torch.equal(enc.patch_pos_embed(37, 37), table)
    resized = enc.patch_pos_embed(37, 28)  # 518 x 392
    grid = table.reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(37, 28), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert torch.equal(resized, ref)
    plain = F.interpolate(grid, size=(37, 28), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert (resized - plain).abs().max() > 1e-2  # antialias matters on a random table


def _to_hf_dinov2(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.mask_token": state["mask_token"],
           "embeddings.position_embeddings": state["pos_embed"], "embeddings.register_tokens": state["register_tokens"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                out[f"{dst}{name}.{p}"] = state[f"{src}{name}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)  # rows: q, then k, then v
            out.update({f"{dst}attention.q_proj.{p}": q, f"{dst}attention.k_proj.{p}": k,
                        f"{dst}attention.v_proj.{p}": v, f"{dst}attention.o_proj.{p}": state[f"{src}attn.proj.{p}"]})
        out[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
    return out


@pytest.mark.parametrize("hw", [(70, 70), (56, 98)])
def test_dino_encoder_matches_transformers_dinov2_with_registers(hw):
    """An independent DINOv2-with-registers implementation (transformers) on the same random weights."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    enc = DinoEncoder(embed_dim=32, depth=2, num_heads=4, img_size=70, feature_layers=[0, 0, 1, 1]).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=70,
        patch_size=14, num_register_tokens=4)).eval()
    hf.load_state_dict(_to_hf_dinov2(enc.state_dict(), 2), strict=True)
    images = torch.rand(2, 3, *hw)
    with torch.no_grad():
        ours = enc(images)
        ref = hf(enc.normalize(images), output_hidden_states=True)
    start = 1 + 4
    torch.testing.assert_close(ours.tokens, ref.last_hidden_state[:, start:], rtol=1e-5, atol=1e-5)
    for feat, i in zip(ours.features, [0, 0, 1, 1]):
        torch.testing.assert_close(feat, hf.layernorm(ref.hidden_states[i + 1])[:, start:], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- encoder selection

def test_build_encoder_clip_and_unknown_kind():
    from vidllm_edge.errors import ConfigError
    from vidllm_edge.models.encoder import CLIPEncoder, build_encoder

    cfg = from_name("tiny")
    cfg.encoder.kind = "clip"
    cfg.encoder.clip = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=70, patch_size=14)
    cfg.encoder.feature_layers = [0, 1, 1, 1]
    torch.manual_seed(0)
    enc = build_encoder(cfg).eval()
    assert isinstance(enc, CLIPEncoder) and enc.patch_size == 14
    meta = ckpt.build_on_meta(lambda: build_encoder(cfg))
    ckpt.load_into(meta, enc.state_dict(), "clip")  # reset_buffers() rebuilds CLIP's position_ids
    ckpt.assert_materialized(meta, "clip")
    images = torch.rand(2, 3, 56, 84)  # not CLIP's 70x70: position embeddings are interpolated
    with torch.no_grad():
        out, again = enc(images), meta.eval()(images)
    assert out.tokens.shape == (2, 24, 64) and [f.shape for f in out.features] == [(2, 24, 64)] * 4
    assert torch.equal(out.features[-1], out.tokens) and torch.equal(again.tokens, out.tokens)
    cfg.encoder.clip["hidden_size"] = 32
    with pytest.raises(ConfigError, match="has width 32"):
        build_encoder(cfg)
    cfg.encoder.kind = "siglip"
    with pytest.raises(ConfigError, match=r"encoder.kind: siglip \| is not a known encoder"):
        build_encoder(cfg)
