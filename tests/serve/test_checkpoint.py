"""``fastdit serve --weights DIR`` on a tiny diffusers-format Wan 2.1 I2V checkpoint: its own UMT5
and CLIP encoders, the image-conditioned DiT, the upload as the conditioning image."""

import pytest

from fastdit.benchmarks.serve_load import call, wait_all
from tests.serve.conftest import serving

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")


def test_an_i2v_checkpoint_serves_what_fastdit_generate_makes(tmp_path):
    """Catches: the checkpoint's text / image encoders not the ones the server runs (a different
    video than generate's), an image-conditioned model run without its image, the CLIP states
    left out of the packed batch."""
    import imageio.v3 as iio
    import numpy as np

    from fastdit.cli import main
    from tests.runtime.test_generate import tiny_checkpoint
    from tests.serve.test_server import _multipart

    weights = tiny_checkpoint(tmp_path / "i2v", i2v=True)
    image = tmp_path / "in.png"
    iio.imwrite(image, np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    fields = {"prompt": "a fox", "size": "48x32", "frames": "5", "steps": "3", "seed": "4"}
    with serving(str(tmp_path / "db" / "jobs.sqlite"), "--weights", str(weights)) as (url, engine):
        assert engine.served.name == "i2v" and engine.image_encoder is not None
        status, answer = call(url, "POST", "/v1/videos", *_multipart(fields, {}))
        assert status == 400 and answer["error"]["param"] == "input_reference"  # an I2V model needs its image
        status, video = call(
            url, "POST", "/v1/videos", *_multipart(fields, {"input_reference": ("in.png", image.read_bytes())})
        )
        assert status == 200, video
        assert wait_all(url, [video["id"]], 120)[video["id"]]["status"] == "completed"
        served = call(url, "GET", f"/v1/videos/{video['id']}/content")[1]
    out = tmp_path / "generated.mp4"
    assert (
        main(
            [
                "generate",
                "--weights",
                str(weights),
                "--mode",
                "i2v",
                "--input",
                str(image),
                "--prompt",
                "a fox",
                "--size",
                "32x48x5",
                "--steps",
                "3",
                "--seed",
                "4",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes() == served
