"""The Triton GEMV kernels (`models/gemv.py`) and FastLLM's kernel switch.

The kernel tests need CUDA and Triton and are skipped with that reason elsewhere (CI has no GPU); they run
on the lent GPU with ``python -m pytest tests/models/test_gemv.py``. The switch's refusals run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import DependencyError, InputError
from vidllm_edge.models import gemv, quant
from vidllm_edge.models.fast_llm import FastLLM
from vidllm_edge.models.llm import build_llm
from vidllm_edge.models.config import LLMConfig

needs_gpu = pytest.mark.skipif(not gemv.available(), reason="needs a CUDA GPU and Triton (models/gemv.py kernels)")

QWEN = dict(model_type="qwen2", vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
            tie_word_embeddings=True)


def _fast(device="cpu", dtype=torch.float32, max_seq: int = 128) -> FastLLM:
    torch.manual_seed(0)
    llm = build_llm(LLMConfig(hf_config=QWEN))
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35 if ("embed" in name or "lm_head" in name) else p.shape[1] ** -0.5)
    return FastLLM.from_hf(llm, dtype=dtype, device=device, max_seq=max_seq)


def test_switch_refuses_triton_where_it_cannot_run_and_unknown_kinds():
    fast = _fast()
    if not gemv.available():
        with pytest.raises(DependencyError, match=r"GEMV kernel: triton \| needs CUDA, Triton and bf16/fp16"):
            fast.set_gemv("triton")
    with pytest.raises(InputError, match=r"GEMV kernel: cublas \| is unknown"):
        fast.set_gemv("cublas")
    counts = fast.set_gemv("auto")  # float32 on the CPU: every linear stays on torch
    assert counts == {"triton": 0, "torch": 2 * 4 + 1}
    assert not any(getattr(m, "triton_gemv", False) for m in fast.modules())


@needs_gpu
@pytest.mark.parametrize("mode", gemv.MODES)
@pytest.mark.parametrize("n,k", [(1000, 384), (4096, 1536), (152, 2048)])
@pytest.mark.parametrize("silu", [False, True])
def test_kernel_matches_the_dequantized_product(mode, n, k, silu):
    torch.manual_seed(n + k)
    w = torch.randn(n, k, device="cuda") * 0.05
    x = torch.randn(2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    args = {}
    if mode == "dense":
        args["w"] = w.bfloat16()
    elif mode == "int8":
        q, s = quant.quantize_int8(w)
        args.update(w=q, scale=s)
    else:
        q, s, z = quant.quantize_int4(w, 128)
        args.update(w=q, scale=s, zero=z)
    weight = args.pop("w")
    y = gemv.gemv(x, weight, mode=mode, bias=bias, silu_mul=silu, **args)
    ref = gemv.reference(x, weight, mode=mode, bias=bias, silu_mul=silu, **args)
    assert y.shape == (n,) and y.dtype == torch.bfloat16
    rel = float((y.float() - ref).norm() / ref.norm())
    assert rel < 6e-3, f"{mode} N={n} K={k} silu={silu}: rel-L2 {rel:.2e}"  # bf16 output rounding: 2e-3 to 4e-3


@needs_gpu
@pytest.mark.parametrize("recipe", ["bf16", "int8", "int4"])
def test_decode_step_on_triton_matches_torch_eager_and_compiled(recipe):
    fast = _fast("cuda", torch.bfloat16)
    if recipe != "bf16":
        quant.quantize_fast_llm(fast, 8 if recipe == "int8" else 4, "rtn")
    ids = torch.randint(0, QWEN["vocab_size"], (20,), device="cuda")
    with torch.inference_mode():
        fast.prefill(fast.embed(ids), 0)
        tok, pos = ids[-1:], torch.tensor([20], device="cuda")
        fast.set_gemv("torch")
        ref = fast.decode_step(tok, pos)[0].float()
        counts = fast.set_gemv("triton")
        assert counts["triton"] == 2 * 4 + 1
        eager = fast.decode_step(tok, pos)[0].float()
        step = torch.compile(fast.decode_step, fullgraph=True, dynamic=False)
        compiled = step(tok, pos)[0].float()
    # The Triton kernels accumulate in float32 and scale in float32; the torch path rounds its product to bf16
    # first: a few 1e-4 of cosine apart on INT8/INT4 (a wrong scale, nibble or group index gives < 0.9).
    floor = 0.9999 if recipe == "bf16" else 0.999
    for name, got, ref_, need in (("triton eager vs torch", eager, ref, floor),
                                  ("compiled vs triton eager", compiled, eager, 0.9999)):
        cos = float(torch.nn.functional.cosine_similarity(got, ref_, dim=0))
        assert cos > need, f"{recipe} {name}: logit cosine {cos:.6f}"


@needs_gpu
def test_fast_decoder_compiled_on_cuda_answers_as_eager():
    """The compiled decode loop and the compiled question chunk (CUDA graphs) give the eager decoder's tokens."""
    from vidllm_edge.models.config import LLMConfig as Cfg
    from vidllm_edge.models.llm import BoxHead, GenerationConfig
    from vidllm_edge.models.tokenizer import tiny_tokenizer
    from vidllm_edge.runtime.fast_decoder import FastDecoder

    tok = tiny_tokenizer()
    answers = []
    for compile_ in (False, True):
        fast = _fast("cuda", torch.float32, max_seq=256)
        head = BoxHead(QWEN["hidden_size"], 32).cuda().eval()
        dec = FastDecoder(fast, tok, head, Cfg(hf_config=QWEN, box_head_hidden=32), compile=compile_)
        dec.eos_ids = set()
        dec.prefill_prefix(torch.randn(40, QWEN["hidden_size"], generator=torch.Generator().manual_seed(1)).cuda())
        assert dec.prefix_len + dec.chunk + 24 <= fast.max_seq  # room for the padded chunk and the answer
        gen = GenerationConfig(max_new_tokens=24)
        answers.append([[a for _, a in dec.stream(q, gen) if a is not None][0].token_ids
                        for q in ("Where is the chair?", "How many doors are there?")])
        if compile_:
            assert dec.prefill_log[-1][1] <= dec.chunk and dec._chunk_step is not None  # the compiled chunk ran
    assert answers[0] == answers[1]
