"""Write (or check) the README's table of diffusers transformers served by fastdit.

Each row is measured, not typed: the transformer is built from its tiny random config
(tests/integrations/tiny_diffusers.py), run with diffusers' default attention and then patched by
``fastdit.patch(model, backend="reference")`` (fastdit's float-math backend, so a matching result
cannot come from torch running the same kernel twice), forward and input gradients in fp32 on CPU.

    python scripts/diffusers_support.py            # rewrite the table in README.md
    python scripts/diffusers_support.py --check    # exit 1 if README.md's table is stale
    python scripts/diffusers_support.py --print    # print the table
"""

import argparse
import logging
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = "<!-- diffusers-support: start (scripts/diffusers_support.py writes it) -->"
END = "<!-- diffusers-support: end -->"


def _cp(cls) -> str:
    """diffusers' context parallelism with the fastdit backend, as tests/integrations/
    test_diffusers_context_parallel.py runs it."""
    from tests.integrations.test_diffusers_context_parallel import ULYSSES_MODELS

    if cls.__name__ == "WanTransformer3DModel":
        return "Ulysses, Ring (tested)"
    if cls.__name__ in ULYSSES_MODELS:
        return "Ulysses (tested)"
    return "diffusers plan (not run)" if getattr(cls, "_cp_plan", None) else "no diffusers plan"


def rows(backend: str = "reference") -> list[str]:
    import diffusers

    from tests.integrations.tiny_diffusers import MODELS, survey

    lines = [
        "| transformer (diffusers class) | attention calls served | masked calls on varlen | context parallel "
        "| fused RoPE / adaLN | forward rel err | input-grad rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in MODELS:
        if not hasattr(diffusers, spec.cls):
            continue
        result = survey(spec, backend=backend)
        if result.error is not None:
            served = f"refused: {result.error}"
        else:
            served = f"{result.served} / {result.native_sdpa_calls}"
            if result.escaped or result.fallbacks:
                served += f" ({result.escaped} escaped, {result.fallbacks} reported)"
        fused = "yes" if spec.cls == "WanTransformer3DModel" else "no (diffusers' code)"
        out_cell, grad_cell = f"{result.out_err:.1e}", f"{result.grad_err:.1e}"
        if result.against_exact is not None:  # a model that amplifies rounding: both against exact attention
            (native_out, native_grad), (fast_out, fast_grad) = result.against_exact
            out_cell += f" (vs exact attention: default {native_out:.1e}, fastdit {fast_out:.1e})"
            grad_cell += f" (vs exact attention: default {native_grad:.1e}, fastdit {fast_grad:.1e})"
        lines.append(
            f"| {spec.name} (`{spec.cls}`) | {served} | {result.varlen} / {result.native_masked} "
            f"| {_cp(getattr(diffusers, spec.cls))} | {fused} | {out_cell} | {grad_cell} |"
        )
    return lines


def table() -> str:
    import diffusers

    return "\n".join([START, *rows(), "", f"Measured with diffusers {diffusers.__version__}.", END])


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def current() -> str:
    """The table as README.md has it now (markers included)."""
    text = _readme()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    return text[start : end + len(END)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md's table differs")
    mode.add_argument("--print", action="store_true", help="print the table, change nothing")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    fresh = table()
    if args.print:
        print(fresh)
        return 0
    if args.check:
        if current() != fresh:
            print("README.md's diffusers support table is stale: run python scripts/diffusers_support.py")
            return 1
        return 0
    updated = _readme().replace(current(), fresh)  # read in full before the file is opened for writing
    with open(os.path.join(ROOT, "README.md"), "w", encoding="utf-8") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
