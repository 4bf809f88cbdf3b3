"""``fastdit serve --preset tiny`` on 127.0.0.1: the official ``openai`` client end to end, shared
forwards with bitwise batch invariance against serving alone and ``fastdit generate``, bad
requests, the queue limit, cancellation, metrics. Every loop is bounded in count and time."""

import io
import json
import re
import time

import pytest

from fastdit.benchmarks.serve_load import call, wait_all

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the client marks its API so
openai = pytest.importorskip("openai", reason="the API tests use the official client: pip install -e .[test]")


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _metric(url: str, name: str) -> dict[str, float]:
    """Every sample of a metric family from /metrics: {'name{labels}': value}."""
    status, text = call(url, "GET", "/metrics")
    assert status == 200
    samples = {}
    for line in text.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_the_openai_client_creates_polls_downloads_and_deletes(server):
    import imageio.v3 as iio

    url, _engine = server
    client = _client(url)
    video = client.videos.create(model="fastdit-tiny", prompt="a red fox", size="96x64",
                                 extra_body={"frames": 9, "steps": 3, "seed": 1})  # fmt: skip
    assert (video.object, video.status, video.size, video.seconds, video.model) == ("video", "queued", "96x64", "0.5",
                                                                                    "fastdit-tiny")  # fmt: skip
    deadline = time.monotonic() + 60
    while video.status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed" and video.progress == 100 and video.completed_at >= video.created_at
    frames = iio.imread(io.BytesIO(client.videos.download_content(video.id).read()), extension=".mp4")
    assert frames.shape == (9, 64, 96, 3)  # size is WIDTHxHEIGHT
    assert video.id in [v.id for v in client.videos.list(limit=100)]
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)


def test_three_sizes_share_forwards_and_each_is_bitwise_itself_alone_and_fastdit_generate(server, tmp_path):
    """Catches: a request whose video depends on what ran beside it, a served request that differs
    from the CLI's (prompt encoding, seeding, schedule or MP4 writing), and a server that never
    packs requests together (samples per forward stays at one request's two CFG samples)."""
    from fastdit.cli import main

    url, engine = server
    client = _client(url)
    asks = [("96x64", 3), ("64x64", 4), ("128x96", 5)]  # (WIDTHxHEIGHT, seed)
    shared_before = _forwards_over(url, 2)
    # sent back to back: the second and third join the first at a step boundary long before its 30 steps end
    together = [client.videos.create(prompt="snow", size=size, extra_body={"frames": 9, "steps": 30, "seed": seed})
                for size, seed in asks]  # fmt: skip
    wait_all(url, [v.id for v in together], 120)
    assert _forwards_over(url, 2) > shared_before  # forwards held more than one request's two samples
    for video, (size, seed) in zip(together, asks):
        packed = engine.store.get(video.id).video
        alone = client.videos.create(prompt="snow", size=size, extra_body={"frames": 9, "steps": 30, "seed": seed})
        wait_all(url, [alone.id], 120)
        assert engine.store.get(alone.id).video == packed  # content-addressed: the same digest is the same bytes
        width, height = size.split("x")
        out = tmp_path / f"{seed}.mp4"
        assert main(["generate", "--preset", "tiny", "--model-seed", "0", "--prompt", "snow", "--size",
                     f"{height}x{width}", "--frames", "9", "--steps", "30", "--seed", str(seed), "--device", "cpu",
                     "--out", str(out)]) == 0  # fmt: skip
        assert out.read_bytes() == client.videos.download_content(video.id).read()


def test_image_to_video_from_an_upload_equals_fastdit_generate(server, tmp_path):
    """``input_reference`` through the openai client's upload: the first frame is the image (a T2V
    model: the known first latent frame), bitwise what ``fastdit generate --mode i2v`` makes of the
    same file. Catches: the upload decoded differently from generate's --input (RGBA, resizing),
    the image not reaching the job, the stored input not content-addressed."""
    import imageio.v3 as iio
    import numpy as np

    from fastdit.cli import main

    url, engine = server
    pixels = np.random.default_rng(5).integers(0, 256, (40, 56, 4), dtype=np.uint8)  # RGBA, resized to 64x96
    image = tmp_path / "first.png"
    iio.imwrite(image, pixels)
    client = _client(url)
    with open(image, "rb") as f:
        video = client.videos.create(prompt="from an image", size="96x64", input_reference=f,
                                     extra_body={"frames": 9, "steps": 4, "seed": 2})  # fmt: skip
    assert wait_all(url, [video.id], 120)[video.id]["status"] == "completed"
    assert engine.store.get(video.id).spec["mode"] == "i2v"
    out = tmp_path / "i2v.mp4"
    assert main(["generate", "--preset", "tiny", "--model-seed", "0", "--prompt", "from an image", "--mode", "i2v",
                 "--input", str(image), "--size", "64x96", "--frames", "9", "--steps", "4", "--seed", "2",
                 "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    assert out.read_bytes() == client.videos.download_content(video.id).read()


def _forwards_over(url: str, samples: int) -> float:
    """How many forwards held more than ``samples`` samples (from the histogram)."""
    metric = _metric(url, "fastdit_samples_per_forward")
    at_most = metric[f'fastdit_samples_per_forward_bucket{{le="{samples}.0"}}']
    return metric["fastdit_samples_per_forward_count"] - at_most


def _multipart(fields: dict, files: dict) -> tuple[bytes, dict]:
    boundary = "fastdit-test-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")  # fmt: skip
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


BAD_REQUESTS = [  # (method, path, body, headers, status): each catches a request that reaches the batch or a 500
    ("POST", "/v1/videos", b'{"prompt": "x", "size": "sixty"}', {"Content-Type": "application/json"}, 400),
    ("POST", "/v1/videos", b'{"prompt": "x", "size": "4096x4096"}', {"Content-Type": "application/json"}, 400),
    ("POST", "/v1/videos", b'{"prompt": "x", "seconds": -4}', {"Content-Type": "application/json"}, 400),
    ("POST", "/v1/videos", b'{"prompt": "x", "seed": 1e400}', {"Content-Type": "application/json"}, 400),
    ("POST", "/v1/videos", b'{"prompt": "x",', {"Content-Type": "application/json"}, 400),  # truncated JSON
    ("POST", "/v1/videos", b'["prompt"]', {"Content-Type": "application/json"}, 400),  # not an object
    ("POST", "/v1/videos", b"prompt=x", {"Content-Type": "text/plain"}, 415),
    ("POST", "/v1/videos", *_multipart({"prompt": "x"}, {"input_reference": ("a.png", b"GIF89a not really")}), 400),
    ("POST", "/v1/videos", *_multipart({"prompt": "x"}, {"prompt": ("p.txt", b"x")}), 400),  # a file as a field
    ("POST", "/v1/videos", *_multipart({"prompt": "x", "seed": "1", "frames": "9"}, {}), 200),  # (good: control)
    ("POST", "/v1/videos", b"x" * (17 << 20), {"Content-Type": "application/json"}, 413),  # over --max-body-mb
    # the same without a Content-Length (chunked): counted as it arrives
    ("POST", "/v1/videos", iter([b"x" * (1 << 20)] * 17), {"Content-Type": "application/json"}, 413),
    ("GET", "/v1/videos/video_" + "0" * 32, None, {}, 404),  # unknown id
    ("GET", "/v1/videos/..%2F..%2Fetc%2Fpasswd", None, {}, 404),  # a path as an id
    ("GET", "/v1/videos/" + "a" * 5000, None, {}, 404),  # a huge id (not echoed whole)
    ("GET", "/v1/videos/video_" + "0" * 32 + "/content", None, {}, 404),
    ("DELETE", "/v1/videos/video_" + "0" * 32, None, {}, 404),
    ("GET", "/v1/videos?limit=0", None, {}, 400),
    ("GET", "/v1/videos?limit=abc", None, {}, 400),
    ("GET", "/v1/videos?order=sideways", None, {}, 400),
    ("GET", "/v1/videos?after=video_" + "1" * 32, None, {}, 404),
    ("PUT", "/v1/videos", b"{}", {"Content-Type": "application/json"}, 405),
    ("GET", "/v2/anything", None, {}, 404),
]


@pytest.mark.bad_input
def test_bad_requests_get_4xx_with_a_message_and_the_batch_goes_on(server):
    url, _engine = server
    client = _client(url)
    running = client.videos.create(prompt="keeps going", size="64x64", extra_body={"frames": 9, "steps": 40})
    for method, path, body, headers, status in BAD_REQUESTS:
        got, answer = call(url, method, path, body, headers)
        assert got == status, (method, path[:60], got, answer)
        if status != 200:
            error = answer["error"]
            assert error["message"] and error["type"] and "Traceback" not in json.dumps(answer), answer
            assert len(error["message"]) < 400  # nothing echoed whole (a 5000-character id, a 17 MB body)
    assert wait_all(url, [running.id], 120)[running.id]["status"] == "completed"  # the batch went on
    codes = _metric(url, "fastdit_http_requests_total")
    assert not any('status="500"' in key for key in codes)


def test_a_full_queue_answers_429_and_delete_cancels_a_running_job(server):
    url, engine = server
    client = _client(url)
    long = client.videos.create(prompt="long", size="64x64", extra_body={"frames": 9, "steps": 400})
    saved, engine.max_queue = engine.max_queue, 1
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.videos.create(prompt="one more", size="64x64", extra_body={"frames": 9})
        assert info.value.body["type"] == "rate_limit_error" and "--max-queue" in info.value.body["message"]
    finally:
        engine.max_queue = saved
    deadline = time.monotonic() + 30
    while client.videos.retrieve(long.id).status != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job = engine._running[long.id][0]
    key = 'fastdit_jobs_finished_total{status="cancelled"}'
    cancelled = _metric(url, "fastdit_jobs_finished_total").get(key, 0)
    client.videos.delete(long.id)
    deadline = time.monotonic() + 30
    while job in engine.batcher.active or job.status == "in_progress":  # it leaves at the next step boundary
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert job.status == "cancelled" and job.step < job.steps
    assert _metric(url, "fastdit_jobs_finished_total")[key] == cancelled + 1


def test_each_job_has_a_progress_bar_in_the_log(server, caplog):
    """Catches: no progress in the log, a bar that never reaches its end, one job's bar under
    another's id."""
    import logging

    url, _engine = server
    caplog.set_level(logging.INFO, logger="fastdit.serve")
    video = _client(url).videos.create(prompt="logged", size="64x64", extra_body={"frames": 9, "steps": 10})
    wait_all(url, [video.id], 120)
    bars = [r.getMessage() for r in caplog.records if r.name == "fastdit.serve" and video.id in r.getMessage()]
    assert any("[##########..........]  50% step 5/10" in bar for bar in bars), bars
    assert any("[####################] 100% step 10/10" in bar for bar in bars), bars
    assert any("completed" in bar for bar in bars) and len(bars) <= 13  # a tenth at a time, not every step


@pytest.mark.bad_input
def test_a_video_file_removed_behind_the_servers_back_is_410_not_500(server):
    import os

    url, engine = server
    video = _client(url).videos.create(prompt="removed", size="64x64", extra_body={"frames": 9, "steps": 2})
    wait_all(url, [video.id], 120)
    os.remove(engine.videos.path(engine.store.get(video.id).video))
    status, answer = call(url, "GET", f"/v1/videos/{video.id}/content")
    assert status == 410 and answer["error"]["code"] == "gone"


def test_metrics_and_health(server):
    url, _engine = server
    status, health = call(url, "GET", "/health")
    assert status == 200 and health["model"] == "fastdit-tiny" and health["default_size"] == "96x64"
    status, text = call(url, "GET", "/metrics")
    names = {name.removesuffix("_total") for name in re.findall(r"^# TYPE (\S+)", text.decode(), re.M)}
    assert {"fastdit_http_requests", "fastdit_jobs", "fastdit_queue_depth", "fastdit_forwards",
            "fastdit_samples_per_forward", "fastdit_tokens_per_forward", "fastdit_step_seconds"} <= names  # fmt: skip
    status, page = call(url, "GET", "/")
    assert status == 200 and b"<form" in page and b"/v1/videos" in page
