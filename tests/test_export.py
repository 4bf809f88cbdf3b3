"""ONNX export (DiT and VAE decoder): checker, TensorRT-parsable ops, onnxruntime parity at several
sizes from one file; the CLI; the TensorRT path where tensorrt imports (it does not here)."""

import pathlib

import numpy as np
import pytest
import torch

from fastdit.cli import main
from fastdit.export.onnx import ExportDiT, ExportVAEDecoder, check_onnx, to_onnx
from fastdit.export.tensorrt import Profile, TensorRTDiT, build_engine, euler_cfg_step, tensorrt_missing
from fastdit.models import DiT, preset
from tests.models.test_vae_fast import random_vae

onnx = pytest.importorskip("onnx", reason="the export tests need `pip install -e .[export]`")
ort = pytest.importorskip("onnxruntime", reason="the export tests need `pip install -e .[export]`")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (`.[export]`)")


def random_dit(**changes):
    torch.manual_seed(0)
    model = DiT(preset("tiny").replace(**changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def dit_onnx(tmp_path_factory):
    """One export for the file's DiT tests, its weights in a side file (what a model past
    protobuf's 2 GiB gets): the parity and graph tests read it as a user's big model would."""
    model = random_dit()
    path = to_onnx(model, tmp_path_factory.mktemp("onnx") / "dit.onnx", external_data=True)
    return model, path


def test_export_twin_is_the_dit():
    for changes in ({}, {"cross_attn_norm": False, "rope_interleaved": False}):
        model = random_dit(**changes)
        x, t, text = torch.randn(2, 16, 3, 8, 12), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 32)
        with torch.no_grad():
            assert rel(ExportDiT(model)(x, t, text), model(x, t, text)) <= 1e-5


@pytest.mark.parametrize("shape, text_len", [((2, 16, 3, 8, 12), 5), ((1, 16, 1, 4, 4), 9), ((3, 16, 5, 6, 10), 2),
                                             ((1, 16, 2, 16, 2), 1)])  # fmt: skip
def test_dit_onnx_parity_at_many_sizes_from_one_file(dit_onnx, shape, text_len):
    model, path = dit_onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, t, text = torch.randn(*shape), torch.rand(shape[0]) * 1000, torch.randn(shape[0], text_len, 32)
    with torch.no_grad():
        expect = model(x, t, text)
    (got,) = session.run(None, {"latents": x.numpy(), "timestep": t.numpy(), "text": text.numpy()})
    assert got.shape == tuple(expect.shape)
    assert rel(got, expect) <= 1e-4


def test_dit_onnx_graph_is_standard_and_tensorrt_parsable(dit_onnx):
    _, path = dit_onnx
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in graph.graph.input] == ["latents", "timestep", "text"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert all(isinstance(d, str) for d in dims[0][:1] + dims[0][2:]) and isinstance(dims[2][1], str)  # dynamic
    ops = check_onnx(path)
    assert "MatMul" in ops and "Softmax" in ops and "LayerNormalization" in ops
    assert not {"Attention", "Loop", "If"} & set(ops)


def test_external_weights_for_big_models(dit_onnx):
    model, path = dit_onnx
    path = pathlib.Path(path)  # to_onnx returns the path as a string
    side = [p for p in path.parent.iterdir() if p.name != "dit.onnx"]
    assert [p.name for p in side] == ["dit.onnx.data"] and side[0].stat().st_size > 100_000  # weights beside it
    assert path.stat().st_size < side[0].stat().st_size  # the graph alone in the .onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, t, text = torch.randn(1, 16, 2, 4, 4), torch.tensor([5.0]), torch.randn(1, 4, 32)
    with torch.no_grad():
        expect = model(x, t, text)
    (got,) = session.run(None, {"latents": x.numpy(), "timestep": t.numpy(), "text": text.numpy()})
    assert rel(got, expect) <= 1e-4


@pytest.mark.bad_input
def test_check_onnx_rejects_what_tensorrt_cannot_parse(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Det", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "det.onnx")
    with pytest.raises(ValueError, match="outside the TensorRT-parsable set"):
        check_onnx(tmp_path / "det.onnx")
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "f64.onnx")
    with pytest.raises(ValueError, match="float64"):
        check_onnx(tmp_path / "f64.onnx")


def test_vae_decoder_onnx_parity(tmp_path):
    vae = random_vae()
    z = torch.randn(1, 16, 3, 4, 6)
    with torch.no_grad():
        assert rel(ExportVAEDecoder(vae)(z), vae.decode(z)) <= 1e-5  # one graph == the streaming decode
    path = to_onnx(vae, tmp_path / "vae.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 16, 3, 4, 6), (2, 16, 2, 3, 5)]:
        z = torch.randn(*shape)
        with torch.no_grad():
            expect = vae.decode(z)
        (got,) = session.run(None, {"z": z.numpy()})
        assert got.shape == tuple(expect.shape) and rel(got, expect) <= 1e-4


def test_cli_export_onnx_tiny_and_from_diffusers_weights(tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    assert main(["export", "onnx", "--preset", "tiny", "--out", str(out)]) == 0
    assert "checked: standard ops TensorRT parses" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"latents": np.zeros((1, 16, 1, 4, 4), np.float32), "timestep": np.ones(1, np.float32),
             "text": np.zeros((1, 3, 32), np.float32)}  # fmt: skip
    (got,) = session.run(None, feeds)
    assert got.shape == (1, 16, 1, 4, 4) and np.isfinite(got).all()

    pytest.importorskip("diffusers", reason="a diffusers-format directory needs diffusers")
    from tests.models.test_dit_diffusers_parity import make_wan

    wan = make_wan()
    wan.save_pretrained(tmp_path / "weights" / "transformer", safe_serialization=True)
    out = tmp_path / "wan.onnx"
    assert main(["export", "onnx", "--weights", str(tmp_path / "weights"), "--out", str(out)]) == 0
    x, t, text = torch.randn(1, 4, 3, 6, 10), torch.tensor([300.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        expect = wan(x, t, text).sample
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"latents": x.numpy(), "timestep": t.numpy(), "text": text.numpy()})
    assert rel(got, expect) <= 1e-4  # diffusers' own model, through fastdit's ONNX graph
    assert (
        main(["export", "onnx", "--weights", str(tmp_path / "weights"), "--vae", "--out", str(tmp_path / "v.onnx")])
        == 2
    )


def test_profiles_and_precisions_are_validated():
    assert Profile.parse("480x832x81").latent(16) == (16, 21, 60, 104)
    for bad in ("480x832", "480x830x81", "480x832x80"):
        with pytest.raises(ValueError, match="profile"):
            Profile.parse(bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        build_engine("x.onnx", "x.engine", [Profile.parse("480x832x81")], precision="int4")


def test_cli_tensorrt_says_why_it_cannot_build(tmp_path, capsys):
    assert main(["export", "tensorrt", "--onnx", "x.onnx", "--out", "x.engine", "--profile", "480x832"]) == 2
    assert "HEIGHTxWIDTHxFRAMES" in capsys.readouterr().err
    if tensorrt_missing() is not None:
        assert main(["export", "tensorrt", "--onnx", "x.onnx", "--out", "x.engine", "--profile", "480x832x81"]) == 2
        assert "tensorrt cannot be imported" in capsys.readouterr().err


def test_euler_cfg_step_matches_the_sampler_math():
    model = random_dit()
    x, text, negative = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    with torch.no_grad():
        step = euler_cfg_step(model, x, 0.8, 0.6, text, negative, 4.0)
        t = torch.full((1,), 800.0)
        cond, uncond = model(x, t, text), model(x, t, negative)
    torch.testing.assert_close(step, x - 0.2 * (uncond + 4.0 * (cond - uncond)), atol=1e-5, rtol=1e-5)


needs_tensorrt = pytest.mark.skipif(
    tensorrt_missing() is not None or not torch.cuda.is_available(),
    reason="TensorRT engines need the tensorrt package and a GPU; neither is installable on this project's "
    f"machines ({tensorrt_missing()})",
)


@needs_tensorrt
def test_tensorrt_engine_matches_pytorch(dit_onnx, tmp_path):
    model, path = dit_onnx
    engine = build_engine(path, tmp_path / "dit.engine", [Profile.parse("32x48x5")], precision="fp32",
                          text_dim=32, text_len=8)  # fmt: skip
    runner = TensorRTDiT(engine)
    model = model.cuda()
    x, t, text = (
        torch.randn(2, 16, 2, 4, 6, device="cuda"),
        torch.tensor([10.0, 600.0], device="cuda"),
        torch.randn(2, 8, 32, device="cuda"),
    )
    with torch.no_grad():
        assert rel(runner(x, t, text).cpu(), model(x, t, text).cpu()) <= 1e-3
        step = euler_cfg_step(runner, x[:1], 0.9, 0.7, text[:1], text[1:], 5.0)
        assert rel(step.cpu(), euler_cfg_step(model, x[:1], 0.9, 0.7, text[:1], text[1:], 5.0).cpu()) <= 1e-3


def test_profiles_follow_the_checkpoints_vae():
    """Catches Wan 2.1's 8x VAE assumed for Wan 2.2's 16x one (a 480x832 bucket's latent is then
    60x104 where the graph gets 30x52), and frames checked against a fixed 4."""
    wan22 = Profile.parse("480x832x81", spatial=16, temporal=4)
    assert wan22.latent(48) == (48, 21, 30, 52)
    with pytest.raises(ValueError, match="multiples of 32"):
        Profile.parse("480x816x81", spatial=16)  # 816 = 16 x 51: whole latents, but not whole 2x2 patches
    assert Profile.parse("480x832x81").latent(16) == (16, 21, 60, 104)  # Wan 2.1 by default


def test_cli_tensorrt_sizes_profiles_from_the_checkpoint(tmp_path, capsys):
    """Catches `--weights` ignored: a Wan 2.2 checkpoint's VAE (16x) decides what a bucket must divide."""
    pytest.importorskip("diffusers", reason="writing a diffusers checkpoint needs `pip install -e .[diffusers]`")
    from tests.models.test_checkpoint import _write

    weights = _write(tmp_path / "w", wan22_vae=True)
    args = ["export", "tensorrt", "--onnx", "x.onnx", "--out", "x.engine", "--weights", str(weights)]
    assert main([*args, "--profile", "480x816x81"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
    assert main([*args[:-2], "--weights", str(tmp_path), "--profile", "480x832x81"]) == 2
    assert "must hold transformer/ and vae/" in capsys.readouterr().err
