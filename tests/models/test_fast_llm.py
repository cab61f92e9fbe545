"""The fast decoder (static KV cache, device-side loop) and its INT8/INT4 formats, against the reference.

Two kinds of tiny model:
* "chaotic" (every 2-D weight re-drawn with std 0.35, as test_llm.py does): real logit margins, so greedy
  tokens must match the reference exactly; but each linear multiplies activations by ~4, so any 4-bit
  perturbation scrambles the logits. Used for exact parity only.
* "realistic" (unit-gain linears, residual projections scaled by 1/sqrt(2 * layers) as GPT-2 does,
  embeddings / lm_head std 0.35, and four RMSNorm outlier channels x8, the activation outliers AWQ exists
  for): used for the quantization thresholds. On it a wrong dequantization (nibbles swapped, scales of
  the neighbouring group, zero point dropped, INT8 scales of another row) gives a logit cosine of
  0.06-0.78, far below the thresholds below.
"""

from __future__ import annotations

import math

import pytest
import torch

from vidllm_edge.errors import CheckpointError, ConfigError, InputError
from vidllm_edge.models import quant
from vidllm_edge.models.config import LLMConfig
from vidllm_edge.models.fast_llm import FastLLM, source_identity, teacher_forced_logits
from vidllm_edge.models.llm import BoxHead, GenerationConfig, ReferenceDecoder, build_llm
from vidllm_edge.models.tokenizer import tiny_tokenizer
from vidllm_edge.runtime.fast_decoder import DecodeLoop, FastDecoder, sample_logits

SHAPES = {
    # Qwen2: GQA (4 heads over 2 KV heads), q/k/v biases, tied lm_head.
    "qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
                  tie_word_embeddings=True),
    # LLaMA: no GQA (as LLaMA-7B), head_dim 64 != hidden / heads, untied, every bias on (covers all bias paths).
    "llama": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                  rope_theta=500000.0, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
}
OUTLIERS = [3, 17, 40, 99]
LOGIT_ATOL = 1e-4  # fp32; transformers' own eager vs SDPA attention differ by ~3e-5 on these models

# Teacher-forced parity on the realistic models (measured: qwen2 / llama).
THRESHOLDS = {  # recipe: (min mean logit cosine, min top-1 agreement)
    "int8-rtn": (0.998, 0.85),  # 0.9994 / 0.9996, top-1 0.91 / 0.97
    "int8-awq": (0.998, 0.85),  # 0.9996 / 0.9996, top-1 0.91 / 0.98
    "int4-rtn": (0.89, 0.30),  # 0.908 / 0.919, top-1 0.35 / 0.52 (random-logit margins are small)
    "int4-awq": (0.915, 0.50),  # 0.929 / 0.945, top-1 0.57 / 0.62
}


def _build(kind: str, init: str, seed: int = 0):
    torch.manual_seed(seed)
    llm = build_llm(LLMConfig(hf_config=SHAPES[kind]))
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if p.dim() != 2:
                continue
            if init == "chaotic" or "embed" in name or "lm_head" in name:
                p.normal_(0.0, 0.35)
            else:
                residual = "o_proj" in name or "down_proj" in name
                p.normal_(0.0, (1 / math.sqrt(2 * llm.config.num_hidden_layers) if residual else 1.0) / math.sqrt(p.shape[1]))
        if init == "realistic":
            for layer in llm.model.layers:
                layer.input_layernorm.weight[OUTLIERS] = 8.0
                layer.post_attention_layernorm.weight[OUTLIERS] = 8.0
    return llm.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=sorted(SHAPES))
def chaotic(request):
    return request.param, _build(request.param, "chaotic")


@pytest.fixture(scope="module", params=sorted(SHAPES))
def realistic(request):
    """A realistic model, its fp32 teacher-forced logits, and each recipe's (mean cosine, top-1, calibration
    error, per-linear report), computed once for both tests below."""
    llm = _build(request.param, "realistic")
    g = torch.Generator().manual_seed(5)
    sequence = torch.randint(0, 512, (80,), generator=g)
    calibration = [torch.randint(0, 512, (48,), generator=g) for _ in range(4)]
    reference = FastLLM.from_hf(llm, max_seq=256)
    ref = teacher_forced_logits(reference, sequence, 16)
    ref_calib = [teacher_forced_logits(reference, c, 8) for c in calibration]
    results = {}
    for recipe in THRESHOLDS:
        bits, method = (8 if recipe.startswith("int8") else 4), recipe.split("-")[-1]
        fast = FastLLM.from_hf(llm, max_seq=256)
        report = quant.quantize_fast_llm(fast, bits, method, calibration=calibration)
        got = teacher_forced_logits(fast, sequence, 16)
        results[recipe] = {
            "cosine": float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean()),
            "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "calib_error": sum(float((teacher_forced_logits(fast, c, 8) - r).pow(2).mean())
                               for c, r in zip(calibration, ref_calib)),
            "report": report}
    return request.param, results


def _cfg(kind: str) -> LLMConfig:
    return LLMConfig(hf_config=SHAPES[kind], box_head_hidden=32)


def _decoders(kind, llm, tok, max_seq=512, **fast_kwargs):
    torch.manual_seed(2)
    head = BoxHead(llm.config.hidden_size, 32).eval()
    ref = ReferenceDecoder(llm, tok, head, _cfg(kind))
    fast = FastDecoder(FastLLM.from_hf(llm, max_seq=max_seq), tok, head, _cfg(kind), **fast_kwargs)
    ref.eos_ids = fast.eos_ids = set()  # random weights: compare a fixed number of tokens
    return ref, fast


def _answer(decoder, question, gen):
    return [a for _, a in decoder.stream(question, gen) if a is not None][0]


# -- fp32 parity with the reference ---------------------------------------------------------------
def test_greedy_tokens_and_logits_match_reference(chaotic, tok):
    kind, llm = chaotic
    ref, fast = _decoders(kind, llm, tok)
    visual = torch.randn(7, llm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ref.prefill_prefix(visual)
    fast.prefill_prefix(visual)
    gen = GenerationConfig(max_new_tokens=64)
    expected = _answer(ref, "Where is the red chair?", gen)
    got = _answer(fast, "Where is the red chair?", gen)
    assert len(expected.token_ids) == 64
    assert got.token_ids == expected.token_ids and got.text == expected.text

    # The same 64 tokens teacher-forced through both: prefill logits, then every decode step's logits.
    q_ids = tok(ref.parts.question_template.format(question="Where is the red chair?"), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        pairs = [(ref._forward(ref._embed(q_ids)), fast._forward(fast._embed(q_ids)))]
        for token in expected.token_ids:
            pos = torch.tensor([fast._seq_len()])
            logits, hidden = fast.fast.decode_step(torch.tensor([token]), pos)
            fast._len += 1
            pairs.append((ref._forward(ref._embed([token])), (logits, hidden)))
    # The benchmark's bandwidth floor counts what a step reads: all weights once (tied: the table is lm_head).
    params = {p.data_ptr(): p for p in llm.parameters()}.values()
    table = llm.model.embed_tokens.weight
    untied_table = 0 if SHAPES[kind]["tie_word_embeddings"] else (table.shape[0] - 1) * table.shape[1] * 4
    assert fast.fast.weight_bytes_per_token() == sum(p.numel() * 4 for p in params) - untied_table
    worst_logits = max(float((r[0] - f[0]).abs().max()) for r, f in pairs)
    worst_hidden = max(float((r[1] - f[1]).abs().max()) for r, f in pairs)
    assert worst_logits <= LOGIT_ATOL and worst_hidden <= LOGIT_ATOL, (worst_logits, worst_hidden)


def test_prefix_is_prefilled_once_and_questions_do_not_interfere(tok):
    llm = _build("qwen2", "chaotic")
    _, fast = _decoders("qwen2", llm, tok)
    fast.prefill_prefix(torch.randn(9, llm.config.hidden_size, generator=torch.Generator().manual_seed(3)))
    prefix = fast.prefix_len
    gen = GenerationConfig(max_new_tokens=24)
    first = _answer(fast, "Where is the red chair?", gen)
    second = _answer(fast, "How many boxes are in the room?", gen)
    again = _answer(fast, "Where is the red chair?", gen)
    assert again.token_ids == first.token_ids and second.token_ids != first.token_ids
    assert fast._seq_len() == prefix  # cropped back by moving the pointer
    starts = [start for start, _ in fast.prefill_log]
    assert fast.prefill_log[0] == (0, prefix) and starts[1:] == [prefix] * 3  # the prefix was computed once


def test_box_uses_the_hidden_state_of_loc(tok):
    llm = _build("qwen2", "chaotic")
    ref, _ = _decoders("qwen2", llm, tok)
    bias = torch.full((llm.config.vocab_size,), -1e4)
    bias[ref.loc_id] = 1e4  # force <loc> at every step
    llm.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        ref, fast = _decoders("qwen2", llm, tok)
        visual = torch.randn(3, llm.config.hidden_size)
        boxes = []
        for dec in (ref, fast):
            dec.prefill_prefix(visual)
            answer = _answer(dec, "Find the chair.", GenerationConfig(max_new_tokens=3))
            assert answer.token_ids == [dec.loc_id] * 3
            boxes.append(torch.tensor(answer.boxes))
    finally:
        del llm.lm_head.bias
        llm.lm_head.bias = None
    assert boxes[1].shape == (3, 6) and torch.allclose(boxes[0], boxes[1], atol=1e-4)


def test_sampling_on_device_is_seeded_and_top_p_keeps_the_head(tok):
    llm = _build("llama", "chaotic")
    _, fast = _decoders("llama", llm, tok)
    fast.prefill_prefix(torch.randn(4, llm.config.hidden_size))
    gen = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    a, b = _answer(fast, "Describe the room.", gen), _answer(fast, "Describe the room.", gen)
    c = _answer(fast, "Describe the room.", GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=4))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids

    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    one, half = torch.tensor(1.0), torch.tensor(0.5)
    picks = {int(sample_logits(logits, torch.rand(4, generator=torch.Generator().manual_seed(s)), one, half, True))
             for s in range(20)}
    assert picks == {0}  # top-p 0.5 keeps only the most likely token (p ~ 0.52)
    picks = {int(sample_logits(logits, torch.rand(4, generator=torch.Generator().manual_seed(s)), one, one, False))
             for s in range(40)}
    assert picks == {0, 1}  # without top-p both heads are drawn, the -10 tail (p ~ 1e-7) is not


@pytest.mark.parametrize("recipe", ["fp32", "int8", "int4"])
def test_decode_step_compiles_as_one_graph_and_matches_eager(recipe):
    """fullgraph=True fails on any graph break (a host sync, a Python int read from a tensor); aot_eager
    checks the trace without paying for code generation. The INT8/INT4 fused GEMV branch runs here."""
    llm = _build("qwen2", "realistic")
    fast = FastLLM.from_hf(llm, max_seq=64)
    if recipe != "fp32":
        quant.quantize_fast_llm(fast, 8 if recipe == "int8" else 4)
    prompt = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(0))
    gens = [GenerationConfig()] + ([GenerationConfig(temperature=0.8, top_p=0.9, seed=1)] if recipe == "fp32" else [])
    runs = []
    for compile_ in (False, True):
        loop = DecodeLoop(fast, compile=compile_, backend="aot_eager", stream_lag=3)
        with torch.inference_mode():
            logits, _ = fast.prefill(fast.embed(prompt), 0)
            runs.append([(list(loop.run(logits, 12, 10, gen)), torch.stack([loop.hidden_state(i) for i in range(10)]))
                         for gen in gens])
    for (eager_ids, eager_hidden), (compiled_ids, compiled_hidden) in zip(*runs):
        assert eager_ids == compiled_ids and torch.allclose(eager_hidden, compiled_hidden, atol=1e-4)


# -- quantization -----------------------------------------------------------------------------------
def test_int4_and_int8_formats_are_exact_to_half_a_step():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    w[:, 7] *= 20  # an outlier column
    packed, scale, zero = quant.quantize_int4(w, 128)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 128) and scale.shape == zero.shape == (32, 2)
    q = quant.unpack_int4(packed)
    assert int(q.max()) <= 15 and torch.equal(quant.pack_int4(q), packed)
    deq = quant.dequantize_int4(packed, scale, zero, 128)
    step = scale.float().repeat_interleave(128, dim=1)
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
    q8, s8 = quant.quantize_int8(w)
    assert bool(((quant.dequantize_int8(q8, s8) - w).abs() <= s8[:, None] / 2 + 1e-6).all())

    x = torch.randn(1, 1, 256)
    lin = quant.Int4Linear.from_float(w, torch.randn(32), torch.float32, 128)
    eager = lin(x)
    assert torch.allclose(eager, x @ deq.t() + lin.bias, atol=1e-5)
    fused = quant._int4_gemv(x, lin.weight, lin.scales, lin.zeros, 128) + lin.bias  # the compiled one-token form
    assert torch.allclose(fused, eager.reshape(-1), atol=1e-5)
    # PyTorch's own INT4 kernel (the CPU twin of CUDA tinygemm) reads our scales/zeros the same way.
    lin.set_kernel("cpu-int4pack", torch.float32)
    assert torch.allclose(lin(torch.cat([x, x + 1], 1)), torch.cat([eager, (x + 1) @ deq.t() + lin.bias], 1), atol=1e-4)


def test_awq_fold_preserves_the_function():
    """Scales folded into the norms / up rows / v rows without quantizing: the model must not change."""
    llm = _build("llama", "realistic")  # no GQA: the o <- v fold is exercised too
    fast = FastLLM.from_hf(llm, max_seq=64)
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1))
    before = teacher_forced_logits(fast, ids, 8)
    inputs = quant.collect_linear_inputs(fast, [fast.embed(ids)])
    for i, block in enumerate(fast.layers):
        names = quant._LINEARS
        weights = {n: block.get_submodule(n).weight.float() for n in names}
        biases = {n: block.get_submodule(n).bias.float() for n in names}
        scales = {n: inputs[f"layers.{i}.{n}"].abs().mean(0).clamp(min=1e-3) ** 0.5 for n in names}
        quant._fold_scales(block, fast.cfg, weights, biases, scales, torch.float32)
        for n in names:
            block.get_submodule(n).weight = torch.nn.Parameter(weights[n], requires_grad=False)
            block.get_submodule(n).bias = torch.nn.Parameter(biases[n], requires_grad=False)
    after = teacher_forced_logits(fast, ids, 8)
    assert float((after - before).abs().max()) <= 1e-3 * float(before.abs().max())


@pytest.mark.parametrize("recipe", sorted(THRESHOLDS))
def test_quantized_logits_track_fp32(realistic, recipe):
    kind, results = realistic
    bits, method = (8 if recipe.startswith("int8") else 4), recipe.split("-")[-1]
    got = results[recipe]
    assert got["report"]["recipe"] == quant.recipe_name(bits, method)
    assert all(r["err_awq"] <= r["err_rtn"] for r in got["report"]["linears"])  # per linear, by construction
    min_cos, min_top1 = THRESHOLDS[recipe]
    assert got["cosine"] >= min_cos and got["top1"] >= min_top1, (kind, recipe, got["cosine"], got["top1"])


@pytest.mark.parametrize("bits", [8, 4])
def test_awq_beats_rtn_on_the_calibration_prompts(realistic, bits):
    kind, results = realistic
    rtn, awq = (results[f"int{bits}-{m}"]["calib_error"] for m in ("rtn", "awq"))
    assert awq <= 0.9 * rtn, (kind, bits, rtn, awq)  # measured: 0.57-0.84x


def test_quantized_file_round_trip_is_exact_and_refuses_another_model(tmp_path):
    llm = _build("qwen2", "realistic")
    calibration = [torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    fast = FastLLM.from_hf(llm, max_seq=128)
    quant.quantize_fast_llm(fast, 4, "awq", calibration=calibration)
    path = quant.save_quantized(fast, tmp_path)
    assert path.name == "llm.int4-g128-awq.safetensors"
    meta = quant.read_quant_metadata(path)
    assert (meta["bits"], meta["group_size"], meta["method"], meta["calibration_prompts"]) == ("4", "128", "awq", "3")
    assert meta["source_weights_fingerprint"] == source_identity(llm)["weights_fingerprint"]

    loaded = quant.load_quantized(path, source=llm, max_seq=128)
    original, restored = fast.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(original[k].dtype == restored[k].dtype and torch.equal(original[k], restored[k]) for k in original)
    ids = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(9))
    assert torch.equal(teacher_forced_logits(fast, ids, 8), teacher_forced_logits(loaded, ids, 8))

    other = _build("qwen2", "realistic", seed=1)
    theirs, ours = meta["source_weights_fingerprint"][:16], source_identity(other)["weights_fingerprint"][:16]
    with pytest.raises(CheckpointError, match=rf"^Quantized LLM: .*was made for another model: .*{theirs}.*{ours}"):
        quant.load_quantized(path, source=other)
    with pytest.raises(CheckpointError, match=r"was made for another model"):
        FastDecoder.from_hf(other, tiny_tokenizer(), BoxHead(128, 32), _cfg("qwen2"), quantized=path)


def test_quantize_llm_cli_on_a_hugging_face_folder(tmp_path, tok, capsys):
    import argparse

    from vidllm_edge.models.quant_cli import add_quantize_llm_parser, cmd_quantize_llm

    llm = _build("llama", "realistic")
    llm.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    parser = argparse.ArgumentParser()
    add_quantize_llm_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quantize-llm", "--checkpoint", str(tmp_path / "hf"), "--bits", "8", "--calib-prompts",
                              "4", "--out", str(tmp_path / "q")])
    assert cmd_quantize_llm(args) == 0
    out = capsys.readouterr().out
    assert "parity vs unquantized" in out and (tmp_path / "q" / "llm.int8-awq.safetensors").is_file()
    fast = quant.load_quantized(tmp_path / "q" / "llm.int8-awq.safetensors", source=llm)
    assert fast.quant["calibration_prompts"] == 4 and isinstance(fast.lm_head, quant.Int8Linear)


def test_quantize_llm_cli_on_our_checkpoint_feeds_the_fast_decoder(tmp_path, capsys):
    import argparse

    from vidllm_edge.models.model import build_model
    from vidllm_edge.models.quant_cli import add_quantize_llm_parser, cmd_quantize_llm

    model = build_model("tiny", seed=0)  # hidden 64: INT4 needs a group that divides it
    model.save_pretrained(tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    add_quantize_llm_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quantize-llm", "--checkpoint", str(tmp_path / "ckpt"), "--bits", "4", "--method", "rtn",
                              "--group-size", "64", "--out", str(tmp_path / "q")])
    assert cmd_quantize_llm(args) == 0
    path = tmp_path / "q" / "llm.int4-g64-rtn.safetensors"
    assert path.is_file() and "wrote" in capsys.readouterr().out
    dec = FastDecoder.from_hf(model.llm, model.tokenizer, model.box_head, model.cfg.llm, quantized=path, max_seq=256)
    dec.eos_ids = set()
    dec.prefill_prefix(torch.randn(5, model.dim_llm))
    assert len(_answer(dec, "What is in the room?", GenerationConfig(max_new_tokens=8)).token_ids) == 8


# -- errors ---------------------------------------------------------------------------------------
def test_unsupported_architecture_names_model_type_and_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ConfigError, match=r"^LLM architecture: model_type='gpt2' \| is not supported.*\n"
                                          r"Note: Supported model_type values: llama, qwen2"):
        FastLLM.from_hf(gpt2)


def test_prompts_longer_than_the_context_are_input_errors(tok):
    llm = _build("qwen2", "chaotic")
    _, fast = _decoders("qwen2", llm, tok, max_seq=96)
    assert fast.max_context == 96 and len(fast.parts.prefix_ids) < 60
    with pytest.raises(InputError, match=r"^Scene prefix \| has \d+ tokens, the LLM's context is 96"):
        fast.prefill_prefix(torch.randn(60, llm.config.hidden_size))
    with pytest.raises(InputError, match=r"^Input tensor: inputs_embeds \| Received 97 tokens at position 0; "
                                         r"the static KV cache holds 96"):
        fast.fast.prefill(torch.randn(1, 97, llm.config.hidden_size), 0)
    fast.prefill_prefix(torch.randn(20, llm.config.hidden_size))
    with pytest.raises(InputError, match=r"^Question \| needs \d+ tokens; only \d+ are left"):
        list(fast.stream("Where is the chair? " * 10, GenerationConfig()))
    answer = _answer(fast, "Where?", GenerationConfig(max_new_tokens=500))  # the answer stops at the context
    assert fast.prefix_len + len(answer.token_ids) + len(
        tok(fast.parts.question_template.format(question="Where?"), add_special_tokens=False)["input_ids"]) == 96


def test_padded_chunk_step_equals_prefill_and_the_answer_after_it(chaotic, tok):
    """The fixed-shape question step (`chunk_step`, compiled into one CUDA graph on the GPU) with padding
    gives the prefill's logits and hidden state, and the decode after it the same tokens: the padding's K/V
    past the question are masked and overwritten."""
    kind, llm = chaotic
    fast = FastLLM.from_hf(llm, max_seq=256)
    other = FastLLM.from_hf(llm, max_seq=256)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randn(1, 11, llm.config.hidden_size, generator=g)
    question = fast.embed(torch.randint(0, 512, (9,), generator=g))
    with torch.inference_mode():
        for model in (fast, other):
            model.prefill(prefix, 0)
        want_logits, want_hidden = fast.prefill(question, 11)
        padded = torch.cat([question, torch.randn(1, 23, llm.config.hidden_size, generator=g)], dim=1)  # 32 rows
        logits, hidden = other.chunk_step(padded, torch.arange(11, 43), torch.tensor([8]))
        assert float((logits - want_logits).abs().max()) <= LOGIT_ATOL
        assert float((hidden - want_hidden).abs().max()) <= LOGIT_ATOL
        gen = GenerationConfig(max_new_tokens=16)
        want = list(DecodeLoop(fast).run(want_logits, 20, 16, gen))
        got = list(DecodeLoop(other).run(logits, 20, 16, gen))
    assert got == want
