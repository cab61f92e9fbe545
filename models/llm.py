"""The language side: a `transformers` causal LM fed through ``inputs_embeds``, the projector, the
grounding box head, and the reference (torch) prompt/prefill/decode path.

Any Hugging Face causal LM of the LLaMA or Qwen2 families works: built from a config dict (with
``model_type``) or loaded from a local folder. The reference decode loop here is the ground truth the
fast decoder and the exported graphs are compared with; it favours clarity over speed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from vidllm_edge.errors import CheckpointError, ConfigError, InputError
from vidllm_edge.models.config import LLMConfig

SUPPORTED_LLMS = ("qwen2", "llama")


def _hf_config(cfg: LLMConfig):
    from transformers import AutoConfig

    if cfg.path:
        folder = Path(cfg.path)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"LLM folder: {folder}", "has no config.json.",
                                  "Point llm.path to a local Hugging Face model folder (save_pretrained output).")
        hf = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    elif cfg.hf_config:
        params = dict(cfg.hf_config)
        model_type = params.pop("model_type", None)
        if model_type is None:
            raise ConfigError("LLM config: hf_config", "has no model_type.", "Add model_type (qwen2 or llama).")
        hf = AutoConfig.for_model(model_type, **params)
    else:
        raise ConfigError("LLM config", "has neither hf_config nor path.",
                          "Give a Hugging Face config dict (with model_type) or a local model folder.")
    if hf.model_type not in SUPPORTED_LLMS:
        raise ConfigError(f"LLM architecture: {hf.model_type}", "is not supported.",
                          f"Use a model of the {' or '.join(SUPPORTED_LLMS)} family.")
    return hf


def build_llm(cfg: LLMConfig) -> nn.Module:
    """Build the causal LM from ``cfg`` (random init from ``hf_config``; weights when ``path`` is set).

    Called under ``torch.device('meta')`` it allocates nothing; see `materialize_rotary`.
    """
    from transformers import AutoModelForCausalLM

    hf = _hf_config(cfg)
    hf.use_cache = True
    if cfg.path and torch.empty(0).device.type != "meta":
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, config=hf, local_files_only=True,
                                                         dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"LLM folder: {cfg.path}", f"cannot be loaded ({exc}).",
                                  "Check the folder holds a complete save_pretrained output.") from exc
    else:
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    # Eager attention: the exact reference math, and what the exporter traces.
    model.config._attn_implementation = "eager"
    return model.eval()


def materialize_rotary(llm: nn.Module) -> None:
    """Rebuild non-persistent rotary buffers left on ``meta`` after an assign-load (they are not in checkpoints)."""
    for name, module in list(llm.named_modules()):
        inv = getattr(module, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.is_meta and hasattr(module, "config"):
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            for buf_name, buf in fresh.named_buffers(recurse=False):
                setattr(module, buf_name, buf)
            if hasattr(fresh, "attention_scaling"):
                module.attention_scaling = fresh.attention_scaling


class Projector(nn.Module):
    """Linear-GELU-Linear from the scene token width C to the LLM width."""

    def __init__(self, dim_in: int, dim_llm: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_llm)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim_llm, dim_llm)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [M, C] -> [M, C_llm]
        return self.fc2(self.act(self.fc1(tokens)))


class BoxHead(nn.Module):
    """Grounding head: LLM hidden state [N, C_llm] -> box [N, 6] = (cx, cy, cz, dx, dy, dz) in metres.

    Sizes go through softplus so they are positive; the centre is unconstrained (world frame).
    """

    def __init__(self, dim_llm: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_llm, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 6)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(hidden)))
        return torch.cat([out[..., :3], nn.functional.softplus(out[..., 3:])], dim=-1)


@dataclasses.dataclass
class PromptParts:
    """A chat prompt split at the image placeholder: ids before it (the scene prefix) and the template
    pieces around the question."""

    prefix_ids: list[int]
    question_template: str  # text after the placeholder, with "{question}" in it


def split_prompt(tokenizer, cfg: LLMConfig) -> PromptParts:
    """Render the chat template once with a marker question and split it at the image placeholder."""
    marker = "\x00QUESTION\x00"
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": f"{cfg.image_token}\n{marker}"})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(cfg.image_token) != 1:
        raise ConfigError("Chat template", f"renders the image token {cfg.image_token!r} {text.count(cfg.image_token)} times.",
                          "Use a chat template that keeps the user content verbatim.")
    before, after = text.split(cfg.image_token)
    prefix_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
    return PromptParts(prefix_ids=prefix_ids, question_template=after.replace(marker, "{question}"))


@dataclasses.dataclass
class GenerationConfig:
    """Decoding settings. ``temperature`` 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()


@dataclasses.dataclass
class Answer:
    """One answer: the text, its token ids, grounding boxes and timings (ms)."""

    question: str
    text: str
    token_ids: list[int]
    boxes: list[list[float]]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sample_next(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token id from logits [V] (greedy, or temperature + top-p)."""
    if gen.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / gen.temperature, dim=-1)
    if gen.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < gen.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = probs / probs.sum()
    return torch.multinomial(probs, 1, generator=generator)[0]


def cache_argument(llm: nn.Module) -> str:
    """Name of the KV-cache argument of ``llm.forward`` (``cache`` since transformers 5.2x, before: ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def crop_cache(cache, length: int) -> None:
    """Cut a `transformers` cache back to ``length`` tokens (the crop argument changed meaning in 5.0)."""
    import transformers
    from packaging.version import Version

    extra = cache.get_seq_length() - length
    if extra <= 0:
        return
    if Version(transformers.__version__) >= Version("5.0.0"):
        cache.crop(-extra)
    else:
        cache.crop(length)
    assert cache.get_seq_length() == length, f"cache crop left {cache.get_seq_length()} tokens, wanted {length}"


# The contract between the exporter (export/llm.py) and the runtime (runtime/ort_llm.py): file and tensor
# names of the exported decoder. It lives here because both sides import this module and neither may
# import the other.
LLM_PREFILL_FILE = "llm_prefill.onnx"
LLM_DECODE_FILE = "llm_decode.onnx"
LLM_EMBED_FILE = "llm_embed.safetensors"
LLM_EMBED_KEY = "embed_tokens"


def llm_io_names(num_layers: int, with_past: bool) -> tuple[list[str], list[str]]:
    """Input and output names of ``llm_prefill`` (``with_past=False``) or ``llm_decode`` (``with_past=True``).

    Inputs: inputs_embeds [1, T, D] float32, position_ids [1, T] int64, then past_key_{i}, past_value_{i}
    [1, Hkv, past, Dh] per layer (decode only). Outputs: logits [1, V] and hidden [1, D] of the last
    position, then present_key_{i}, present_value_{i} [1, Hkv, past + T, Dh] per layer.
    """
    inputs = ["inputs_embeds", "position_ids"]
    if with_past:
        inputs += [f"past_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]
    outputs = ["logits", "hidden"] + [f"present_{kv}_{i}" for i in range(num_layers) for kv in ("key", "value")]
    return inputs, outputs


class Decoder:
    """Backend-neutral prompt/prefill/decode loop; subclasses own the model state (the KV cache).

    ``prefill_prefix`` runs the scene prefix once; ``stream`` then reuses that state for every question
    and crops it back to the prefix afterwards, so a question never recomputes the prefix.

    A backend implements the hooks below. Embeddings, logits and hidden states cross the hooks as
    float torch tensors (on the backend's device for the reference; CPU for others), so sampling and
    stop logic are shared and identical for every backend.
    """

    def __init__(self, tokenizer, cfg: LLMConfig) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        self.parts = split_prompt(tokenizer, cfg)
        self.loc_id = tokenizer.convert_tokens_to_ids(cfg.loc_token)
        self.eos_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
                        if isinstance(i, int) and i >= 0}
        self.prefix_len = 0
        self._has_prefix = False

    # -- hooks a backend implements ---------------------------------------------------------------
    @property
    def max_context(self) -> int:
        """Positions the LLM supports (prefix + question + answer)."""
        raise NotImplementedError

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """Token ids -> input embeddings [1, T, D]."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Drop all cached state (the next `_forward` starts at position 0)."""
        raise NotImplementedError

    def _forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run embeds [1, T, D] at positions `_seq_len()`.. and append them to the cache.

        Returns the logits [V] and the last-layer (final-norm) hidden state [D] of the last position.
        """
        raise NotImplementedError

    def _seq_len(self) -> int:
        """Tokens in the cache."""
        raise NotImplementedError

    def _crop(self, length: int) -> None:
        """Cut the cache back to its first ``length`` tokens."""
        raise NotImplementedError

    def _box(self, hidden: torch.Tensor) -> list[float]:
        """Box head on one hidden state [D] -> [cx, cy, cz, dx, dy, dz] in metres."""
        raise NotImplementedError

    # -- the shared loop -------------------------------------------------------------------------
    def embed(self, ids: list[int]) -> torch.Tensor:  # -> [1, T, C_llm]
        return self._embed(ids)

    @torch.inference_mode()
    def prefill_prefix(self, visual_tokens: torch.Tensor) -> float:
        """Run system prompt + visual tokens [M, C_llm] once; returns milliseconds."""
        start = time.perf_counter()
        prefix = self._embed(self.parts.prefix_ids)
        embeds = torch.cat([prefix, visual_tokens[None].to(device=prefix.device, dtype=prefix.dtype)], dim=1)
        if embeds.shape[1] >= self.max_context:
            raise InputError("Scene prefix", f"has {embeds.shape[1]} tokens, the LLM's context is {self.max_context}.",
                             "Lower scene.max_visual_tokens or use an LLM with a longer context.")
        self._has_prefix = False  # a failure below leaves no half-built prefix behind
        self._reset()
        self._forward(embeds)
        self.prefix_len = embeds.shape[1]
        self._has_prefix = True
        return (time.perf_counter() - start) * 1e3

    def _question_ids(self, question: str) -> tuple[list[int], int]:
        """Token ids of the question chunk and the answer budget left in the context (InputError if none)."""
        if not self._has_prefix:
            raise InputError("Scene", "has no prefix yet.", "Call Pipeline.encode(video) before asking questions.")
        ids = self.tokenizer(self.parts.question_template.format(question=question), add_special_tokens=False)["input_ids"]
        budget = self.max_context - self.prefix_len - len(ids)
        if budget <= 0:
            raise InputError("Question", f"needs {len(ids)} tokens; only {self.max_context - self.prefix_len} "
                             "are left after the scene prefix.", "Ask a shorter question.")
        return ids, budget

    @torch.inference_mode()
    def stream(self, question: str, gen: GenerationConfig) -> Iterator[tuple[str, Answer | None]]:
        """Yield (new text, None) while decoding, then ("", Answer) once at the end."""
        ids, budget = self._question_ids(question)
        generator = torch.Generator().manual_seed(gen.seed) if gen.temperature > 0 else None
        t0 = time.perf_counter()
        try:
            logits, hidden = self._forward(self._embed(ids))
            ttft = (time.perf_counter() - t0) * 1e3
            out_ids: list[int] = []
            boxes: list[list[float]] = []
            text = ""
            for _ in range(min(gen.max_new_tokens, budget)):
                token = int(sample_next(logits, gen, generator))
                if token in self.eos_ids:
                    break
                out_ids.append(token)
                logits, hidden = self._forward(self._embed([token]))
                if token == self.loc_id:  # the hidden state of <loc> itself carries the box
                    boxes.append(self._box(hidden))
                piece, text = self._new_text(out_ids, text)
                if piece is not None:
                    yield piece, None
                if any(s in text for s in gen.stop_strings):
                    break
            yield "", self._answer(question, out_ids, boxes, t0, ttft)
        finally:
            self._crop(self.prefix_len)  # back to the scene prefix for the next question

    def _new_text(self, out_ids: list[int], text: str) -> tuple[str | None, str]:
        """(text added since ``text``, the new full text); (None, text) while a UTF-8 sequence is incomplete."""
        full = self.tokenizer.decode(out_ids, skip_special_tokens=False)
        if full.endswith("\ufffd"):
            return None, text
        return full[len(text):], full

    def _answer(self, question: str, out_ids: list[int], boxes: list[list[float]], t0: float,
                ttft: float) -> Answer:
        """The final `Answer` with its timings (ms; ``t0`` is the perf_counter at the question's start)."""
        decode_ms = (time.perf_counter() - t0) * 1e3 - ttft
        timings = {"ttft_ms": ttft, "decode_ms": decode_ms, "new_tokens": float(len(out_ids)),
                   "decode_tokens_per_s": (len(out_ids) - 1) / (decode_ms / 1e3) if len(out_ids) > 1 else 0.0}
        text = self.tokenizer.decode(out_ids, skip_special_tokens=False)
        return Answer(question=question, text=text, token_ids=out_ids, boxes=boxes, timings=timings)


class ReferenceDecoder(Decoder):
    """The torch reference: a `transformers` causal LM over a DynamicCache (``self.cache``)."""

    def __init__(self, llm: nn.Module, tokenizer, box_head: nn.Module, cfg: LLMConfig) -> None:
        super().__init__(tokenizer, cfg)
        self.llm, self.box_head = llm, box_head
        self.cache = None

    @property
    def max_context(self) -> int:
        return int(self.llm.config.max_position_embeddings)

    def _embed(self, ids: list[int]) -> torch.Tensor:  # -> [1, T, C_llm]
        table = self.llm.get_input_embeddings()
        return table(torch.tensor([ids], dtype=torch.long, device=table.weight.device))

    def _reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.llm.config)

    def _seq_len(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def _forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self._seq_len()
        positions = torch.arange(past, past + embeds.shape[1], device=embeds.device)[None]
        out = self.llm(inputs_embeds=embeds, position_ids=positions, use_cache=True, output_hidden_states=True,
                       **{cache_argument(self.llm): self.cache})  # the cache object is updated in place
        return out.logits[0, -1], out.hidden_states[-1][0, -1]

    def _crop(self, length: int) -> None:
        crop_cache(self.cache, length)

    def _box(self, hidden: torch.Tensor) -> list[float]:
        return [float(v) for v in self.box_head(hidden[None])[0]]
