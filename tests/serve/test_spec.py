"""The create request's checks (fastdit/serve/spec.py) and the job store (fastdit/serve/store.py),
without a server."""

import io
import os
import struct
import zlib

import pytest

pytest.importorskip("imageio", reason="fastdit serve reads images with imageio: pip install -e .[serve]")
import imageio.v3 as iio  # noqa: E402
import numpy as np  # noqa: E402

from fastdit.models import VAEFacts  # noqa: E402
from fastdit.serve.spec import Limits, RequestError, ServedModel, parse_create, png_bytes, read_image  # noqa: E402
from fastdit.serve.store import ContentFiles, JobRecord, SQLiteJobStore  # noqa: E402

SERVED = ServedModel("fastdit-tiny", VAEFacts(spatial=8, temporal=4, latent_channels=16), (1, 2, 2), False,
                     (96, 64), max_tokens=4096)  # fmt: skip
LIMITS = Limits()


def test_defaults_and_openai_fields():
    spec = parse_create({"prompt": "a fox"}, False, SERVED, LIMITS)
    # OpenAI's defaults: 4 seconds (65 frames at 16 fps), the served model; ours: seed 0, 30 steps
    assert (spec["width"], spec["height"], spec["frames"], spec["seconds"]) == (96, 64, 65, "4")
    assert (spec["seed"], spec["steps"], spec["guidance"], spec["mode"]) == (0, 30, 5.0, "t2v")
    # form fields arrive as strings; size is WIDTHxHEIGHT (OpenAI's order, not generate's HxW)
    spec = parse_create({"prompt": "a fox", "size": "128x64", "seconds": "2", "seed": "7", "steps": "4"}, True,
                        SERVED, LIMITS)  # fmt: skip
    assert (spec["width"], spec["height"], spec["frames"], spec["seconds"]) == (128, 64, 33, "2")
    assert (spec["seed"], spec["steps"], spec["mode"]) == (7, 4, "i2v")
    # frames instead of seconds; the seconds the video object reports follow from them
    spec = parse_create({"prompt": "a fox", "frames": 9, "guidance": 1}, False, SERVED, LIMITS)
    assert (spec["frames"], spec["seconds"], spec["guidance"]) == (9, "0.5", 1.0)


BAD = [  # (fields, the parameter the error names, a piece of its message); each a one-line bug it catches
    ({"prompt": "x", "size": "64"}, "size", "WIDTHxHEIGHT"),  # a size parser that takes one number
    ({"prompt": "x", "size": "64x64x9"}, "size", "WIDTHxHEIGHT"),  # generate's HxWxF syntax taken as a size
    ({"prompt": "x", "size": "-64x64"}, "size", "WIDTHxHEIGHT"),  # a sign taken by int()
    ({"prompt": "x", "size": "99999999999x64"}, "size", "WIDTHxHEIGHT"),  # a huge number parsed (no digit cap)
    ({"prompt": "x", "size": "8192x64"}, "size", "[1, 4096]"),  # no ceiling per side
    ({"prompt": "x", "size": "72x64"}, "size", "multiples of 16"),  # the patch forgotten in the factor
    ({"prompt": "x", "size": "2048x2048"}, "size", "tokens per forward"),  # the token budget not checked up front
    ({"prompt": "x", "seconds": "-4"}, "seconds", "[0.0"),  # negative seconds
    ({"prompt": "x", "seconds": "0"}, "seconds", "> 0"),  # zero seconds making one frame
    ({"prompt": "x", "seconds": "nan"}, "seconds", "[0.0"),  # NaN passing a < / > range check
    ({"prompt": "x", "seconds": "4", "frames": 9}, "frames", "give one"),  # frames silently overriding seconds
    ({"prompt": "x", "frames": 10}, "frames", "1 + 4k"),  # a frame count the VAE cannot take
    ({"prompt": "x", "frames": 2.5}, "frames", "an integer"),  # a float truncated to an int
    ({"prompt": "x", "seed": -1}, "seed", "[0,"),  # a negative seed wrapped by the generator
    ({"prompt": "x", "seed": "1e3"}, "seed", "an integer"),  # a float string taken as a seed
    ({"prompt": "x", "steps": 0}, "steps", "[1,"),  # zero steps: a video of pure noise
    ({"prompt": "x", "guidance": "inf"}, "guidance", "[0.0"),  # inf guidance
    ({"prompt": "x", "guidance": True}, "guidance", "a number"),  # a JSON bool taken as 1.0
    ({"prompt": "x", "guidance": 1, "negative_prompt": "y"}, "negative_prompt", "no effect"),
    ({"prompt": " "}, "prompt", "required"),  # a blank prompt
    ({}, "prompt", "required"),
    ({"prompt": 3}, "prompt", "a string"),  # a JSON number as the prompt
    ({"prompt": "x" * 20_001}, "prompt", "limit"),  # an unbounded prompt
    ({"prompt": "x", "model": "sora-2"}, "model", "not served"),  # any model name accepted
    ({"prompt": "x", "sead": 3}, "sead", "Unknown parameter"),  # a typo silently ignored
    ({"prompt": "x", "input_reference": "http://example.com/a.png"}, "input_reference", "uploaded image"),
    ({"prompt": "x", "seed": "9" * 10_000}, "seed", "..."),  # a 10k-digit value echoed whole in the message
    ({"prompt": "x", "size": "x" * 10_000}, "size", "..."),
    ({"prompt": "x", "p" * 5000: 1}, "p" * 60, "Unknown parameter"),  # a huge parameter name echoed whole
]


@pytest.mark.bad_input
@pytest.mark.parametrize("fields, param, message", BAD, ids=[f"{p[:20]}-{i}" for i, (_, p, _m) in enumerate(BAD)])
def test_bad_fields_are_refused_by_name(fields, param, message):
    with pytest.raises(RequestError) as info:
        parse_create(fields, False, SERVED, LIMITS)
    assert info.value.status == 400 and info.value.param == param and message in info.value.message
    assert len(info.value.message) < 300
    assert info.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.bad_input
def test_an_image_to_video_model_needs_an_image():
    served = ServedModel("i2v", SERVED.vae_facts, (1, 2, 2), True, (96, 64), 4096)
    with pytest.raises(RequestError, match="input_reference"):
        parse_create({"prompt": "x"}, False, served, LIMITS)
    assert parse_create({"prompt": "x", "frames": 9}, True, served, LIMITS)["mode"] == "i2v"


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    iio.imwrite(buffer, pixels, extension=".png")
    return buffer.getvalue()


def test_images_are_read_as_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    assert np.array_equal(read_image(_png(rgb), LIMITS), rgb)
    gray = rgb[..., 0]
    assert np.array_equal(read_image(_png(gray), LIMITS), np.repeat(gray[..., None], 3, -1))  # gray -> RGB
    rgba = np.concatenate([rgb, np.full((16, 24, 1), 7, np.uint8)], -1)
    assert np.array_equal(read_image(_png(rgba), LIMITS), rgb)  # alpha dropped, as generate's --input
    assert np.array_equal(iio.imread(png_bytes(rgb)), rgb)  # what the job reads back is lossless


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its pixels need not follow: the ceiling is read first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),  # an empty upload decoded as an image
        (b"not an image at all", "not a readable image"),  # garbage reaching numpy as an object array
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),  # a PNG signature with a broken body
        (_png_header(5000, 5000), "limit"),  # a decompression bomb: pixels decoded before the size is checked
    ],
    ids=["empty", "garbage", "broken-png", "huge-header"],
)
def test_bad_images_are_refused(data, message):
    with pytest.raises(RequestError, match=message) as info:
        read_image(data, LIMITS)
    assert info.value.status == 400 and info.value.param == "input_reference"


@pytest.mark.bad_input
def test_a_video_is_not_an_input_reference(tmp_path):
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    iio.imwrite(tmp_path / "a.gif", frames)
    with pytest.raises(RequestError, match="one image"):  # catches: only frame 0 of an animation taken
        read_image((tmp_path / "a.gif").read_bytes(), LIMITS)


def _record(n: int, status="queued") -> JobRecord:
    return JobRecord(f"video_{n:032x}", 1000 + n, {"prompt": f"p{n}"}, status)


def test_the_sqlite_store_keeps_jobs_across_reopening(tmp_path):
    path = str(tmp_path / "jobs.sqlite")
    store = SQLiteJobStore(path)
    for n in range(5):
        store.add(_record(n))
    store.update(_record(1).id, status="completed", progress=100, completed_at=5, video="a" * 64)
    store.update(_record(2).id, status="failed", error={"code": "x", "message": "boom"})
    store.set_progress({_record(3).id: 40})
    assert not store.update("video_" + "f" * 32, status="failed")  # a deleted job: False, nothing written
    store.close()
    store = SQLiteJobStore(path)  # a restart reads the same jobs
    assert store.get(_record(1).id).video == "a" * 64 and store.get(_record(2).id).error["message"] == "boom"
    assert store.get(_record(3).id).status == "in_progress"  # progress marks a queued job running
    assert [r.id for r in store.unfinished()] == [_record(n).id for n in (0, 3, 4)]  # oldest first
    assert store.counts() == {"queued": 2, "in_progress": 1, "completed": 1, "failed": 1}
    assert store.references("a" * 64) == 1
    # paging: asc after 1 -> 2, 3; desc after 3 -> 2, 1; has_more says whether more follow
    page, more = store.page(_record(1).id, 2, "asc")
    assert [r.id for r in page] == [_record(2).id, _record(3).id] and more
    page, more = store.page(_record(3).id, 5, "desc")
    assert [r.id for r in page] == [_record(n).id for n in (2, 1, 0)] and not more
    with pytest.raises(KeyError):
        store.page("video_" + "e" * 32, 2, "asc")
    assert store.delete(_record(0).id).id == _record(0).id and store.get(_record(0).id) is None
    assert store.delete(_record(0).id) is None
    with pytest.raises(ValueError, match="updatable"):  # catches: an update that writes any column named
        store.update(_record(4).id, spec="{}")


@pytest.mark.bad_input
def test_content_files_take_no_name_from_outside(tmp_path):
    files = ContentFiles(str(tmp_path / "videos"), ".mp4")
    digest = files.put(b"abc")
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    assert files.put(b"abc") == digest and len(os.listdir(tmp_path / "videos")) == 1  # stored once
    for name in ("../../etc/passwd", "video_" + "0" * 32, digest.upper(), digest + "/x", None):
        with pytest.raises(ValueError, match="digest"):
            files.path(name)
    open(files.temporary(), "wb").close()
    files.sweep_partial()  # a killed server's half-written file is removed at the next start
    assert os.listdir(tmp_path / "videos") == [digest + ".mp4"]
