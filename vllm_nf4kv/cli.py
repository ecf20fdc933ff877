"""``vllm-nf4kv``: the project's command-line tools, one module per subcommand.

Each tool module defines ``add_parser(subparsers)`` that registers its
subcommand and sets ``func`` on the parsed namespace; modules are imported only
when their subcommand runs, so ``vllm-nf4kv plan`` never imports torch models.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "plan": ("vllm_nf4kv.tools.plan", "KV-cache memory planner: bytes per token and tokens that fit"),
    "report": ("vllm_nf4kv.tools.report", "codec quality report: MSE, MAE, max error, cosine"),
    "ablate": ("vllm_nf4kv.tools.ablate", "perplexity ablation of KV formats on a real model"),
    "stats": ("vllm_nf4kv.tools.stats", "prefix-cache statistics of a running vllm serve"),
    "calibrate": ("vllm_nf4kv.tools.calibrate", "measure the nf4 key smoothing of a model through vLLM"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-nf4kv", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in TOOLS else None
    for name, (module, help_text) in TOOLS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
