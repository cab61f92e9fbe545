"""The reference LLM path: tokenizer, prompt split, prefix reuse, greedy parity with `generate`, boxes."""

from __future__ import annotations

import pytest
import torch

from vidllm_edge.errors import ConfigError, InputError
from vidllm_edge.models.config import LLMConfig, from_name
from vidllm_edge.models.llm import BoxHead, GenerationConfig, ReferenceDecoder, build_llm, sample_next, split_prompt
from vidllm_edge.models.tokenizer import SPECIAL_TOKENS, tiny_tokenizer


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = from_name("tiny").llm
    llm = build_llm(cfg)
    with torch.no_grad():  # larger weights than the default init give real logit margins (distinct tokens)
        for p in llm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.35)
    tok = tiny_tokenizer()
    head = BoxHead(llm.config.hidden_size, cfg.box_head_hidden).eval()
    return cfg, llm, tok, head


def test_tiny_tokenizer_is_real_bpe_with_single_special_tokens():
    tok = tiny_tokenizer()
    assert len(tok) == 512
    for special in SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    text = "Where is the red chair? It is 2.5 meters away."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text) // 2  # merges happened: it is a trained BPE, not bytes
    assert tok.decode(ids) == text


def test_prompt_split_keeps_question_after_image(parts):
    cfg, _, tok, _ = parts
    split = split_prompt(tok, cfg)
    full = tok.decode(split.prefix_ids) + cfg.image_token + split.question_template.format(question="Q?")
    expected = tok.apply_chat_template([{"role": "system", "content": cfg.system_prompt},
                                        {"role": "user", "content": f"{cfg.image_token}\nQ?"}],
                                       tokenize=False, add_generation_prompt=True)
    assert full == expected


def _generate_reference(llm, tok, cfg, visual, question, n):
    """transformers' own greedy generate on the same embeddings (the ground truth)."""
    dec = ReferenceDecoder(llm, tok, BoxHead(llm.config.hidden_size, 8), cfg)
    q_ids = tok(dec.parts.question_template.format(question=question), add_special_tokens=False)["input_ids"]
    embeds = torch.cat([dec.embed(dec.parts.prefix_ids), visual[None], dec.embed(q_ids)], dim=1)
    with torch.no_grad():
        out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, -n:].tolist()


def test_greedy_matches_transformers_generate_and_prefix_is_reused(parts):
    cfg, llm, tok, head = parts
    torch.manual_seed(1)
    visual = torch.randn(7, llm.config.hidden_size)
    dec = ReferenceDecoder(llm, tok, head, cfg)
    dec.eos_ids = set()  # random weights: compare a fixed number of tokens
    dec.prefill_prefix(visual)
    prefix_len = dec.cache.get_seq_length()
    gen = GenerationConfig(max_new_tokens=24)
    first = [a for _, a in dec.stream("Where is the red chair?", gen) if a is not None][0]
    assert dec.cache.get_seq_length() == prefix_len  # cropped back to the prefix
    second = [a for _, a in dec.stream("How many boxes?", gen) if a is not None][0]
    again = [a for _, a in dec.stream("Where is the red chair?", gen) if a is not None][0]
    assert again.token_ids == first.token_ids  # the second question did not disturb the prefix
    assert second.token_ids != first.token_ids
    assert first.token_ids == _generate_reference(llm, tok, cfg, visual, "Where is the red chair?", 24)


def test_box_emitted_for_loc_token(parts):
    cfg, llm, tok, head = parts
    dec = ReferenceDecoder(llm, tok, head, cfg)
    dec.prefill_prefix(torch.randn(3, llm.config.hidden_size))
    with torch.no_grad():  # force <loc> as the most likely token at every step
        bias = torch.full((llm.config.vocab_size,), -1e4)
        bias[dec.loc_id] = 1e4
        saved = llm.lm_head.bias
        llm.lm_head.bias = torch.nn.Parameter(bias)
    try:
        answer = [a for _, a in dec.stream("Find the chair.", GenerationConfig(max_new_tokens=2)) if a is not None][0]
    finally:
        llm.lm_head.bias = saved
    assert answer.token_ids == [dec.loc_id, dec.loc_id]
    assert len(answer.boxes) == 2 and all(len(b) == 6 for b in answer.boxes)
    assert all(size > 0 for b in answer.boxes for size in b[3:])  # sizes are positive (softplus)


def test_streamed_pieces_concatenate_to_the_answer(parts):
    cfg, llm, tok, head = parts
    dec = ReferenceDecoder(llm, tok, head, cfg)
    dec.eos_ids = set()
    dec.prefill_prefix(torch.randn(4, llm.config.hidden_size))
    pieces, answer = [], None
    for piece, a in dec.stream("Describe the room.", GenerationConfig(max_new_tokens=12)):
        if a is None:
            pieces.append(piece)
        else:
            answer = a
    assert "".join(pieces) == answer.text and len(answer.token_ids) == 12


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    gen = GenerationConfig(temperature=1.0, top_p=0.5, seed=3)
    picks = {int(sample_next(logits, gen, torch.Generator().manual_seed(s))) for s in range(20)}
    assert picks == {0}  # top-p 0.5 keeps only the first token (p≈0.52)
    assert int(sample_next(logits, GenerationConfig(), None)) == 0


def test_errors_name_the_input(parts):
    cfg, llm, tok, head = parts
    dec = ReferenceDecoder(llm, tok, head, cfg)
    with pytest.raises(InputError, match=r"^Scene \| has no prefix yet"):
        list(dec.stream("Q?", GenerationConfig()))
    with pytest.raises(InputError, match=r"^Scene prefix \| has 2\d\d\d tokens"):
        dec.prefill_prefix(torch.randn(2000, llm.config.hidden_size))
    dec.prefill_prefix(torch.randn(900, llm.config.hidden_size))
    with pytest.raises(InputError, match=r"^Question \| needs \d+ tokens; only \d+ are left"):
        list(dec.stream("Where is the chair? " * 30, GenerationConfig()))
    with pytest.raises(ConfigError, match=r"^LLM architecture: gpt2 \| is not supported"):
        build_llm(LLMConfig(hf_config={"model_type": "gpt2", "n_layer": 1}))
