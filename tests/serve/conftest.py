import threading
import time
from contextlib import contextmanager

import pytest

from fastdit.serve.cli import serve_missing

if serve_missing():
    pytest.skip(serve_missing(), allow_module_level=True)


@contextmanager
def serving(db: str, *flags: str):
    """``fastdit serve --preset tiny`` in this process (uvicorn on a thread, 127.0.0.1, a free port):
    yields ``(base url, engine)``; stopped at exit."""
    import uvicorn

    from fastdit.cli import build_parser
    from fastdit.serve.cli import prepare

    args = build_parser().parse_args(["serve", "--port", "0", "--db", db, "--device", "cpu", "--log-level", "warning",
                                      *flags])  # fmt: skip
    app, engine, sock = prepare(args)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        engine.store.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(str(tmp_path_factory.mktemp("serve") / "jobs.sqlite")) as running:
        yield running
