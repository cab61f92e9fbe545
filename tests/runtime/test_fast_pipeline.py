"""The fast decoder inside the pipeline and the CLI (`run --decoder fast`), on the CPU."""

from __future__ import annotations

import json

import pytest

from vidllm_edge.errors import InputError
from vidllm_edge.models.llm import GenerationConfig
from vidllm_edge.models.model import build_model
from vidllm_edge.runtime.cli import main
from vidllm_edge.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from vidllm_edge.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("scene"), num_frames=8, width=112, height=84)[0]


def test_fast_decoder_answers_as_the_reference_and_is_shared_by_scenes(video):
    model = build_model("tiny", seed=0)
    gen = GenerationConfig(max_new_tokens=12)
    questions = ["Where is the red box?", "What is on the floor?"]
    ref_scene = Pipeline(model, num_frames=4, generation=gen).encode(video)
    want = [ref_scene.ask(q).token_ids for q in questions]
    fast = Pipeline(model, num_frames=4, generation=gen, decoder="fast")
    first = fast.encode(video)
    assert [first.ask(q).token_ids for q in questions] == want
    assert type(first.decoder).__name__ == "FastDecoder"
    second = fast.encode(video)
    assert second.decoder is first.decoder  # converted once per model, not per scene
    assert second.ask(questions[0]).token_ids == want[0]
    with pytest.raises(InputError, match=r"Scene \| no longer holds its LLM prefix"):
        first.ask(questions[0])


def test_unknown_decoder_is_an_input_error():
    with pytest.raises(InputError, match=r"Decoder: turbo \| is unknown"):
        Pipeline(build_model("tiny", seed=0), decoder="turbo")


def test_cli_run_with_the_fast_decoder(video, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--video", str(video), "--preset", "tiny", "--out", str(out), "--frames", "4",
                 "--decoder", "fast", "--question", "Where is the red box?", "--max-new-tokens", "6"])
    assert code == 0, capsys.readouterr().err
    answers = json.loads((out / "answers.json").read_text())["answers"]
    assert len(answers) == 1 and 1 <= len(answers[0]["token_ids"]) <= 6


def test_cli_fast_decoder_needs_the_torch_backend(tmp_path, capsys):
    code = main(["run", "--video", "x.mp4", "--backend", "onnxruntime", "--engines", str(tmp_path), "--decoder", "fast",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Arguments: --decoder fast | applies to --backend torch" in err and "Note:" in err
    assert not (tmp_path / "o").exists()
