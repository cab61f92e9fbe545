"""A real RTSP server on loopback: frames arrive through RtspSource, scenes are encoded, answers come back.

The server is RTSP::Server (Debian package ``rtsp-server-perl``); ffmpeg publishes the synthetic video to
it (ANNOUNCE/RECORD) and our client plays it (DESCRIBE/SETUP/PLAY). ffmpeg 5.1 cannot serve RTSP itself:
``-rtsp_flags listen`` exists only for its RTSP *input*, its RTSP muxer only publishes to a server. That
server relays RTP over UDP only, so those tests use ``transport="udp"``. Our default, TCP (interleaved
RTP), is tested against gst-rtsp-server (Debian: python3-gi gir1.2-gst-rtsp-server-1.0
gstreamer1.0-plugins-good) when the system Python has it.

Every test runs under a SIGALRM deadline, and the server and publishers are killed at the end.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time

import pytest

from vidllm_edge.errors import VideoError
from vidllm_edge.runtime.loop import InferenceLoop, ListFeed, RollingWindow
from vidllm_edge.runtime.sources import RtspSource

TEST_DEADLINE_S = 60
FAST_PROBE = {"analyzeduration": "500000", "probesize": "100000"}  # open in ~1 s instead of ~3 s

pytestmark = [
    pytest.mark.skipif(shutil.which("ffmpeg") is None,
                       reason="needs the ffmpeg program to publish the test stream (apt-get install ffmpeg)"),
    pytest.mark.skipif(shutil.which("rtsp-server-perl") is None,
                       reason="needs a real RTSP server: Debian's rtsp-server-perl (apt-get install rtsp-server-perl); "
                              "ffmpeg cannot serve RTSP itself"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(client port, publish port) of an RTSP::Server on loopback."""
    client, publish = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("rtsp") / "server.log", "w")
    proc = subprocess.Popen(["rtsp-server-perl", "--clientport", str(client), "--serverport", str(publish),
                             "--loglevel", "2"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"rtsp-server-perl did not start (exit {proc.poll()}); see {log.name}")
                time.sleep(0.05)
        yield client, publish
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from vidllm_edge.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("rtsp_video"), num_frames=48, width=96, height=72, fps=12)[0]


@pytest.fixture(scope="module")
def pipeline():
    from vidllm_edge.models.llm import GenerationConfig
    from vidllm_edge.models.model import build_model
    from vidllm_edge.runtime.pipeline import Pipeline

    return Pipeline(build_model("tiny", seed=0), generation=GenerationConfig(max_new_tokens=3))


def _codec() -> str:
    encoders = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return "libx264" if "libx264" in encoders else "mpeg4"


@pytest.fixture
def publish(video, server):
    """publish(name) -> (url to play, ffmpeg process) streaming the video in a loop at its frame rate."""
    procs = []

    def start(name: str):
        codec = ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "6"] \
            if _codec() == "libx264" else ["-c:v", "mpeg4", "-g", "6"]
        proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1",
                                 "-i", str(video), *codec, "-f", "rtsp", f"rtsp://127.0.0.1:{server[1]}/{name}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        return f"rtsp://127.0.0.1:{server[0]}/{name}", proc

    yield start
    for proc in procs:
        _stop(proc)


def _playable(url: str, within_s: float = 20.0, **options) -> RtspSource:
    """An opened RtspSource, once the publisher's stream is announced (404 until then)."""
    deadline = time.monotonic() + within_s
    while True:
        source = RtspSource(url, transport="udp", ffmpeg_options=FAST_PROBE, log=lambda line: None, **options)
        try:
            return source.open()
        except VideoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_frames_from_a_real_rtsp_server_are_encoded_and_answered(pipeline, publish, tmp_path):
    url, _ = publish("live")
    source = _playable(url, stall_timeout_s=5.0, open_timeout_s=5.0)
    loop = InferenceLoop(pipeline, source, RollingWindow(4), reencode_every_s=0.5,
                         questions=ListFeed(["What is in the room?"], repeat=True), out_dir=tmp_path,
                         log=lambda line: None)
    result = loop.run(max_iterations=30)  # 2.5 s of a 12 fps stream
    assert result.reason == "max_iterations" and result.error is None
    assert source.frames_read == 30 and result.scenes >= 2 and result.answers == result.scenes
    assert loop.scene.frames.rgb.shape == (4, 72, 96, 3)
    records = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["scene_id"] for r in records] == list(range(1, result.scenes + 1))
    assert all(r["source"] == f"rtsp stream {url} over udp" for r in records)
    times = loop.window.timestamps()
    assert times == sorted(times) and times[-1] > 1.0  # arrival times on the stream's clock
    report = json.loads((tmp_path / "answers.json").read_text())
    assert report["loop"]["exit"] == "max_iterations" and (tmp_path / "points.ply").is_file()


def test_a_stream_that_ends_mid_scene_ends_cleanly_with_outputs_flushed(pipeline, publish, tmp_path):
    """Through the CLI: the publisher dies before the window is full; exit 3, the partial scene is written."""
    import argparse

    from vidllm_edge.runtime.loop_cli import EXIT_STREAM_LOST, add_loop_args, cmd_run_loop

    url, publisher = publish("mid")
    _playable(url).close()  # announced: the CLI run below can connect
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    parser.add_argument("--question", action="append", default=[])
    parser.add_argument("--out")
    add_loop_args(parser)
    args = parser.parse_args(["--source", url, "--rtsp-transport", "udp", "--out", str(out), "--window", "64",
                              "--reencode-every", "1000", "--stall-timeout", "1", "--max-retries", "1",
                              "--open-timeout", "2", "--question", "What is here?"])

    def kill_when_streaming():
        deadline = time.monotonic() + 30
        while not (out / "answers.jsonl").exists() and time.monotonic() < deadline:  # created once the source opened
            time.sleep(0.05)
        time.sleep(1.0)  # about 12 frames
        publisher.kill()

    killer = threading.Thread(target=kill_when_streaming, daemon=True)
    killer.start()
    lines = []
    code = cmd_run_loop(args, pipeline, model_name="preset:tiny", stream=_Sink(), log=_Sink(lines))
    killer.join(5)
    text = "".join(lines)
    assert code == EXIT_STREAM_LOST == 3, text
    assert f"RTSP stream: {url} | " in text and "after 1 reconnects." in text
    assert "reconnecting (1/1)" in text
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["question"] for r in records] == ["What is here?"] and records[0]["scene_id"] == 1
    report = json.loads((out / "answers.json").read_text())
    assert report["loop"]["exit"] == "stream_lost" and "after 1 reconnects" in report["loop"]["error"]
    assert 1 <= report["frames"]["count"] < 64  # mid-scene: the window never filled
    assert (out / "geometry.npz").is_file() and (out / "points.ply").is_file()


class _Sink:
    """A text stream that keeps what is written (the CLI prints status lines to it)."""

    def __init__(self, into: list | None = None) -> None:
        self.into = into if into is not None else []

    def write(self, text: str) -> int:
        self.into.append(text)
        return len(text)

    def flush(self) -> None:
        pass


GST_SERVER = """
import sys, gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( filesrc location={sys.argv[2]} ! qtdemux ! mpeg4videoparse ! rtpmp4vpay name=pay0 pt=96 )")
server.get_mount_points().add_factory("/live", factory)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()
"""
SYSTEM_PYTHON = "/usr/bin/python3"


def _gst_rtsp_available() -> bool:
    try:
        probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                                "from gi.repository import GstRtspServer"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def test_default_tcp_transport_against_gst_rtsp_server(pipeline, video, tmp_path):
    if not _gst_rtsp_available():
        pytest.skip("TCP transport: needs gst-rtsp-server for /usr/bin/python3 (apt-get install python3-gi "
                    "gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good)")
    script = tmp_path / "gst_server.py"
    script.write_text(GST_SERVER)
    port = _free_port()
    proc = subprocess.Popen([SYSTEM_PYTHON, str(script), str(port), str(video)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        source = RtspSource(f"rtsp://127.0.0.1:{port}/live", open_timeout_s=5.0, log=lambda line: None)
        assert source.transport == "tcp"
        loop = InferenceLoop(pipeline, source.open(), RollingWindow(4), reencode_every_s=1e9,
                             questions=ListFeed(["What is here?"]), out_dir=tmp_path / "out", log=lambda line: None)
        result = loop.run(max_iterations=12)
        assert result.reason == "max_iterations" and result.scenes == 1 and result.answers == 1
        assert loop.scene.frames.rgb.shape == (4, 72, 96, 3) and source.frames_read == 12
    finally:
        _stop(proc)
