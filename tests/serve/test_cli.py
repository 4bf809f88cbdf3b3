"""``fastdit serve``'s flags: what cannot work is one line and exit status 2, before any model loads."""

import socket

import pytest

from fastdit.cli import main


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port must be in"),  # a port the OS would wrap or refuse later
        (["--max-queue", "0"], "--max-queue must be >= 1"),  # a server that refuses every request
        (["--max-batch-tokens", "0"], "--max-batch-tokens must be >= 1"),
        (["--max-body-mb", "0"], "--max-body-mb must be in"),
        (["--model-seed", "-1"], "--model-seed must be in"),
        (["--weights", "/nonexistent/wan"], "no such directory"),
        (["--device", "tpu"], "not a device name"),
    ],
)
def test_flags_that_cannot_work_exit_2(flags, message, capsys, tmp_path):
    assert main(["serve", "--db", str(tmp_path / "jobs.sqlite"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdit serve: error: ") and message in err and err.count("\n") == 1


@pytest.mark.bad_input
def test_a_port_in_use_is_said_before_the_models_load(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--db", str(tmp_path / "jobs.sqlite"), "--device", "cpu"]) == 2
    assert "cannot listen there" in capsys.readouterr().err


@pytest.mark.bad_input
def test_without_the_serve_extra_it_says_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--db", str(tmp_path / "jobs.sqlite")]) == 2
    assert 'pip install "fastdit[serve]"' in capsys.readouterr().err
