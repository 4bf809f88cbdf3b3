"""``fastdit serve``: the flags, their checks, then the models, the store and uvicorn."""

import argparse
import importlib.util
import logging
import os
import socket
import sys

from fastdit.runtime.generate import VAE_FOR_DIT, UsageError


def serve_missing() -> str | None:
    """Why ``fastdit serve`` cannot run here (None when FastAPI, uvicorn and friends are installed)."""
    for module in ("fastapi", "uvicorn", "python_multipart", "prometheus_client", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f'fastdit serve needs {module}: pip install "fastdit[serve]" (or -e ".[serve]" in a checkout)'
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(VAE_FOR_DIT),
                        help="model shapes with random weights when --weights is not given")  # fmt: skip
    parser.add_argument("--weights", default=None, metavar="DIR",
                        help="a local diffusers-format Wan directory with text_encoder/ and tokenizer/ (one-expert "
                        "checkpoints: Wan 2.1 T2V / I2V, Wan 2.2 TI2V-5B)")  # fmt: skip
    parser.add_argument("--model-seed", type=int, default=0, help="seeds the tiny preset's random weights")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one, printed)")
    parser.add_argument("--db", default=os.path.join("fastdit_serve", "jobs.sqlite"), metavar="FILE",
                        help="the SQLite job store; videos/ and inputs/ go beside it")  # fmt: skip
    parser.add_argument("--max-batch-tokens", type=int, default=1 << 16,
                        help="packed tokens one forward may hold (CFG samples count twice); a request needing more "
                        "is refused")  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=256, help="open (queued or running) jobs at most; then 429")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body (input images)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the server's log (each job's progress bar is at info)")  # fmt: skip


def _check(args) -> None:
    """The cheap checks, before any model is built."""
    missing = serve_missing()
    if missing:
        raise UsageError(missing)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_batch_tokens", "max_queue"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.max_body_mb <= 1024:
        raise UsageError(f"--max-body-mb must be in (0, 1024], got {args.max_body_mb}")
    if not 0 <= args.model_seed < 2**64:
        raise UsageError(f"--model-seed must be in [0, 2**64), got {args.model_seed}")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections made while the models load wait in the backlog, not refused
    except OSError as err:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from err
    return sock


def _base_request(args):
    """The server's models as a :class:`GenerationRequest` (every job's request is this with its
    own fields), after the checkpoint's checks."""
    from fastdit.models.wan import VAE_PRESETS
    from fastdit.runtime.generate import GenerationRequest, device_of, open_weights

    checkpoint = open_weights(args.weights)
    if checkpoint is not None:
        if checkpoint.two_experts:
            raise UsageError(f"--weights {args.weights}: fastdit serve runs one-expert checkpoints; Wan 2.2 A14B's "
                             "two experts are not batched by the step batcher yet")  # fmt: skip
        if not checkpoint.has("text_encoder", "tokenizer"):
            raise UsageError(f"--weights {args.weights}: it must hold text_encoder/ and tokenizer/ (prompts)")
    facts = checkpoint.vae_facts if checkpoint else VAE_PRESETS[VAE_FOR_DIT[args.preset]].facts
    return GenerationRequest(
        mode="t2v", height=0, width=0, frames=1, device=device_of(args.device), vae_facts=facts, steps=1, guidance=5.0,
        shift=5.0, seed=0, strength=0.7, out="", preset=args.preset, offload_experts="off", vae_tiling=False,
        weights=args.weights, checkpoint=checkpoint, model_seed=args.model_seed,
    )  # fmt: skip


def _distributed(args):
    """Under torchrun (WORLD_SIZE > 1): the process group (NCCL on GPUs, each rank its LOCAL_RANK's
    device; gloo on CPUs); None on one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    return dist.group.WORLD


def prepare(args, group=None):
    """Check the flags, listen, load the models and open the store: ``(app, engine, socket)``.
    ``group``: the process group of a multi-rank server (this is its rank 0)."""
    _check(args)
    base = _base_request(args)
    folder = os.path.dirname(os.path.abspath(args.db))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--db {args.db}: cannot make its folder {folder} ({err.strerror})") from err
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    sock = _listen(args.host, args.port)  # before the models load: a port in use is said at once
    from fastdit.serve.app import create_app
    from fastdit.serve.engine import Engine
    from fastdit.serve.store import ContentFiles, SQLiteJobStore

    name = os.path.basename(os.path.normpath(args.weights)) if args.weights else f"fastdit-{args.preset}"
    store = SQLiteJobStore(args.db)
    engine = Engine(base, store, ContentFiles(os.path.join(folder, "videos"), ".mp4"),
                    ContentFiles(os.path.join(folder, "inputs"), ".png"), name=name,
                    max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue, group=group)  # fmt: skip
    return create_app(engine, max_body_bytes=int(args.max_body_mb * (1 << 20))), engine, sock


def _follow(args, group) -> None:
    """A rank other than 0: the same models and batcher, stepping as rank 0 says (replicas.py)."""
    _check(args)
    from fastdit.serve.engine import serving_batcher
    from fastdit.serve.replicas import follow

    follow(serving_batcher(_base_request(args), args.max_batch_tokens, group)[0], group)


def run(args) -> None:
    """``fastdit serve``: :func:`prepare`, then uvicorn until interrupted (unfinished jobs stay in
    the store and run when a server starts on it again). Under torchrun rank 0 serves HTTP and
    the other ranks follow its steps."""
    import uvicorn

    group = _distributed(args)
    if group is not None:
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return _follow(args, group)
    app, engine, sock = prepare(args, group)
    host, port = sock.getsockname()[:2]
    print(f"fastdit serve: {engine.served.name} on http://{host}:{port} (jobs in {args.db}; pid {os.getpid()})",
          flush=True)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the interrupt: a clean exit
        pass
    finally:
        engine.store.close()
