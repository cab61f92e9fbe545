"""Tokenizers: a real byte-level BPE for the tiny preset, and local Hugging Face tokenizer folders.

The tiny tokenizer ships as ``models/assets/tiny_tokenizer.json`` (trained by `train_tiny_tokenizer`
on a small built-in corpus, so tests and the demo need no download). Every tokenizer we hand out has
the chat tokens, the image placeholder and the grounding ``<loc>`` token as single special tokens.
"""

from __future__ import annotations

from pathlib import Path

from vidllm_edge.errors import CheckpointError

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER = ASSETS / "tiny_tokenizer.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<loc>", "<pad>"]

# Qwen2-style ChatML template; the image placeholder sits inside the user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS_OBJECTS = ["chair", "table", "sofa", "bed", "lamp", "door", "window", "box", "shelf", "plant",
                   "cabinet", "desk", "monitor", "wall", "floor", "ceiling", "rug", "bottle", "cup", "book"]
_CORPUS_COLOURS = ["red", "green", "blue", "white", "black", "yellow", "brown", "grey", "orange", "wooden"]
_CORPUS_TEMPLATES = [
    "What is the {c} {o} next to?", "Where is the {o}?", "How far is the {o} from the {p}?",
    "The {c} {o} is to the left of the {p}.", "There is a {c} {o} on the floor near the {p}.",
    "Describe the room.", "How many {o}s are in the room?", "The room has a {c} {o} and a {p}.",
    "The {o} is about 2 meters from the camera.", "Find the {c} {o}. <loc>",
]


def _corpus() -> list[str]:
    lines = []
    for i, template in enumerate(_CORPUS_TEMPLATES):
        for j, obj in enumerate(_CORPUS_OBJECTS):
            colour = _CORPUS_COLOURS[(i + j) % len(_CORPUS_COLOURS)]
            other = _CORPUS_OBJECTS[(j + 7 * i + 3) % len(_CORPUS_OBJECTS)]
            lines.append(template.format(c=colour, o=obj, p=other))
    lines += [str(n) for n in range(100)] + ["0.5 1.25 3.75 meters, yes, no, left, right, above, below."]
    return lines


def train_tiny_tokenizer(path: Path = TINY_TOKENIZER, vocab_size: int = 512) -> Path:
    """Train the tiny preset's byte-level BPE on the built-in corpus and write ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _wrap(tokenizer_file: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|im_end|>",
                                  pad_token="<pad>", bos_token=None, unk_token=None)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_tokenizer():
    """The tiny preset's tokenizer (a `transformers` fast tokenizer over the shipped BPE)."""
    return ensure_special_tokens(_wrap(TINY_TOKENIZER))


def load_tokenizer(folder: str | Path):
    """Load a tokenizer from a local folder (tokenizer.json / tokenizer_config.json), no network."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CheckpointError(f"Tokenizer folder: {folder}", "has no tokenizer.json or tokenizer_config.json.",
                              "Point to a Hugging Face model folder saved with save_pretrained, with its tokenizer files.")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises several error types for broken folders
        raise CheckpointError(f"Tokenizer folder: {folder}", f"cannot be loaded ({exc}).",
                              "Re-save the tokenizer with save_pretrained.") from exc
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return ensure_special_tokens(tok)


def ensure_special_tokens(tok, image_token: str = "<image>", loc_token: str = "<loc>"):
    """Make sure the image placeholder and the grounding token are single special tokens."""
    missing = [t for t in (image_token, loc_token) if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Write the tokenizer files into ``folder``: saved into a hidden staging folder first, then moved in."""
    folder = Path(folder)
    staging = folder / ".tokenizer.tmp"
    tokenizer.save_pretrained(str(staging))
    for f in staging.iterdir():
        f.replace(folder / f.name)
    staging.rmdir()
