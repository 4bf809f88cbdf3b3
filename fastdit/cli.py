"""``fastdit`` command line: ``info``, ``generate``, ``serve``, ``bench`` and ``export``."""

import argparse
import difflib
import platform
import re
import sys

import torch

import fastdit
from fastdit import settings
from fastdit._extension import cuda_extension_missing
from fastdit.kernels.launch import triton_missing
from fastdit.ops import attention_policy, dispatch


def _dtype_names(dtypes) -> str:
    return ",".join(str(d).replace("torch.", "").replace("float", "f").replace("bf16", "bf16") for d in dtypes)


def info_text() -> str:
    lines = [
        f"fastdit {fastdit.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})",
    ]
    triton_reason = triton_missing()
    if triton_reason is None:
        import triton

        lines.append(f"triton {triton.__version__}")
    else:
        lines.append(f"triton: unavailable ({triton_reason})")
    if torch.cuda.is_available():
        lines.append(
            f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
        )
    else:
        lines.append("device: cpu (no CUDA device)")
    cuda_reason = cuda_extension_missing()
    lines.append("fastdit._C: loaded" if cuda_reason is None else f"fastdit._C: unavailable ({cuda_reason})")
    switches = sorted(f"{k}={v}" for k, v in settings.as_environ().items())
    lines.append(f"switches: {' '.join(switches)}" if switches else "switches: none set (defaults)")
    for op, source in sorted(dispatch.shape_policies().items()):
        lines.append(f"shape policy: {op} ({source})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines.append(attention_policy.describe(device))
    for op in attention_policy.OPS:
        picks = []
        for dtype in (torch.bfloat16, torch.float32):
            try:
                name = dispatch.device_choice(op, device, dtype)
            except dispatch.BackendNotSupportedError:
                name = "none"
            picks.append(f"{str(dtype).replace('torch.', '')} -> {name}")
        lines.append(f"auto {op} on {device.type}: {', '.join(picks)} (where no policy decides; the first "
                     "provider of the priority list whose limits fit the call)")  # fmt: skip
    lines.append("")
    lines.append("op                       backend        status")
    for op in dispatch.ops():
        table = dispatch.backends(op)
        for name in dispatch.priority(op):
            backend = table[name]
            missing = backend.unavailable
            if missing is None:
                devices = "any device" if backend.devices is None else "/".join(backend.devices)
                status = f"available ({devices}; {_dtype_names(backend.dtypes)})"
                variant = backend.variant_args()
                if variant:
                    status += " variant " + ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                                     for k, v in variant.items())  # fmt: skip
            else:
                status = f"unavailable: {missing}"
            lines.append(f"{op:<24} {name:<14} {status}")
    return "\n".join(lines)


def _bench(args) -> int:
    from fastdit.benchmarks import harness
    from fastdit.benchmarks.suite import SUITE
    from fastdit.runtime.generate import UsageError

    harness.AUTOSAVE_DIR = args.out  # each row reaches the JSON as it is measured
    no_plots = harness.matplotlib_missing()
    if no_plots:
        print(f"note: {no_plots}; writing JSON only", file=sys.stderr)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads < 0:
        raise UsageError(f"--threads must be >= 0, got {threads}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_suites(args, SUITE, device)
    finally:
        torch.set_num_threads(previous)  # main() may be called in-process (tests, notebooks)


def _run_suites(args, suites: dict, device: torch.device) -> int:
    names = list(suites) if args.suite == "all" else [args.suite]
    failed = []
    for name in names:
        print(f"== {name} on {device}{' (quick)' if args.quick else ''}", flush=True)
        report = suites[name].run(args, device)
        paths = report.write(args.out)
        print(report.table())
        print("wrote " + ", ".join(paths))
        failed += [f"{name}: {r['provider']} {r['shape']}: {r['reason']}" for r in report.failed]
    if failed:  # a provider that raised or computed a wrong result: the run is not a measurement
        print(f"FAILED rows ({len(failed)}):\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


class _Parser(argparse.ArgumentParser):
    """No flag is taken for an abbreviation of another (``--prompt`` is not ``--prompt-embeds``),
    and every flag's help shows its default; sub-commands are made with the same class. A usage
    error is one line (``fastdit generate: error: ...``, exit status 2) with a "did you mean" for a
    mistyped sub-command, choice or flag, instead of the whole usage block before it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = _did_you_mean(self, message)
        self.exit(2, f"{self.prog}: error: {message}{hint} (see '{self.prog} --help')\n")


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` and of its sub-commands."""
    flags = []
    for action in parser._actions:  # argparse has no public list of a parser's actions
        flags += [f for f in action.option_strings if f.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                flags += _flags(child)
    return flags


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """ "; did you mean ...?" for argparse's invalid-choice and unrecognized-argument messages."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        options = re.findall(r"'([^']*)'", choice.group(2)) or [o.strip() for o in choice.group(2).split(",")]
        close = difflib.get_close_matches(choice.group(1), options, n=1)
    elif message.startswith("unrecognized arguments:"):
        typed = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("-")]
        close = [m for w in typed for m in difflib.get_close_matches(w, sorted(set(_flags(parser))), n=1)]
    else:
        return ""
    return f"; did you mean {' / '.join(close)}?" if close else ""


def build_parser(bench: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``bench=False`` leaves out the benchmark suites' flags (and their
    imports), which only ``fastdit bench`` needs."""
    parser = _Parser(prog="fastdit", description="fastdit: fast kernels and runtime for video diffusion transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.set_defaults(_subcommands=sub.choices)
    sub.add_parser("info", help="versions, device, and each op's backends with the reason when unavailable")
    from fastdit.runtime import generate

    generate.add_arguments(
        sub.add_parser("generate", help="generate a video or image with a DiT + causal VAE (modes t2v ... v2v)")
    )
    from fastdit.serve import cli as serve_cli

    serve_cli.add_arguments(
        sub.add_parser("serve", help="an OpenAI Videos API server: one packed forward per step for all its requests")
    )
    from fastdit.export import cli as export_cli

    export_cli.add_arguments(sub.add_parser("export", help="export ONNX graphs and TensorRT engines"))
    bench_parser = sub.add_parser("bench", help="run benchmarks; results as JSON + PNG under --out")
    if bench:
        _add_bench_arguments(bench_parser)
    return parser


def _add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    from fastdit.benchmarks.harness import default_out_dir
    from fastdit.benchmarks.suite import SUITE

    bench.add_argument("--suite", default="all", choices=["all", *SUITE], help="which benchmark to run")
    bench.add_argument("--quick", action="store_true", help="smaller shapes and ceilings, for smoke runs")
    bench.add_argument("--out", default=default_out_dir(), help="directory for the JSON and PNG results")
    bench.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    bench.add_argument(
        "--threads", type=int, default=None,
        help="threads torch may use; unset: 1 on a CPU (every provider alike on one core), torch's own on a GPU; "
        "0: torch's own default",
    )  # fmt: skip
    for module in SUITE.values():
        module.add_arguments(bench)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `fastdit generate` / `info` / `export` import nothing of the benchmark suites
    args, extra = build_parser(bench=bool(argv) and argv[0] == "bench").parse_known_args(argv)
    commands = vars(args).pop("_subcommands")
    if extra:  # said by the sub-command, whose flags the suggestion comes from
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "info":
        print(info_text())
        return 0
    from fastdit.models.weights import WeightLoadError
    from fastdit.runtime.generate import UsageError

    try:
        if args.command == "generate":
            from fastdit.runtime import generate

            generate.run(args)
            return 0
        if args.command == "serve":
            from fastdit.serve import cli as serve_cli

            serve_cli.run(args)
            return 0
        if args.command == "export":
            from fastdit.export import cli as export_cli

            export_cli.run(args)
            return 0
        return _bench(args)
    except (UsageError, WeightLoadError) as err:  # a flag or a file that cannot work: one line, exit 2
        print(f"fastdit {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
