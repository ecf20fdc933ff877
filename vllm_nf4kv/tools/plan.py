"""``vllm-nf4kv plan``: KV-cache bytes per token and how many tokens fit.

Reads a Hugging Face ``config.json`` (``num_hidden_layers``,
``num_key_value_heads`` or else ``num_attention_heads``, ``head_dim`` or else
``hidden_size / num_attention_heads``) and prints, for each KV-cache dtype, the
bytes one token costs over all layers and KV heads (K and V) and how many
tokens fit in ``--kv-memory``:

* ``auto``: the model dtype, 2 bytes a value (4 if the config says float32);
* ``fp8``: 1 byte a value (its per-layer scales are not per token);
* ``int4_per_token_head``: :func:`vllm_nf4kv.format.int4_per_token_head_bytes`, for K and for V;
* ``nf4``: the cell of :func:`vllm_nf4kv.format.format_for` (K and V codes and scale codes).

vLLM allocates whole blocks, so a real engine holds up to one block per layer
fewer tokens than the ``tokens`` printed here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from dataclasses import dataclass

from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for, int4_per_token_head_bytes

DTYPES: tuple[str, ...] = ("auto", "fp8", "int4_per_token_head", "nf4")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    auto_bytes: int  # bytes per value of --kv-cache-dtype auto

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        config = config.get("text_config", config)  # multimodal configs nest the language model
        try:
            layers = int(config["num_hidden_layers"])
            heads = int(config["num_attention_heads"])
        except KeyError as missing:
            raise ValueError(
                f"config.json lacks {missing}; need num_hidden_layers and num_attention_heads "
                f"(a Hugging Face causal-LM config)"
            ) from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = config.get("head_dim")
        if head_dim is None:
            if "hidden_size" not in config or config["hidden_size"] % heads:
                raise ValueError(
                    "config.json has no head_dim and hidden_size is not a multiple of num_attention_heads"
                )
            head_dim = config["hidden_size"] // heads
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        return cls(layers, kv_heads, int(head_dim), 4 if dtype in ("float32", "torch.float32") else 2)

    def bytes_per_token(self, dtype: str) -> int:
        """Bytes of K and V for one token over all layers and KV heads (ValueError if unsupported)."""
        if dtype == "auto":
            per_head = 2 * self.head_dim * self.auto_bytes
        elif dtype == "fp8":
            per_head = 2 * self.head_dim
        elif dtype == "int4_per_token_head":
            if self.head_dim % 2:
                raise ValueError(f"int4_per_token_head needs an even head_dim, got {self.head_dim}")
            per_head = 2 * int4_per_token_head_bytes(self.head_dim)
        elif dtype == "nf4":
            per_head = format_for(KV_CACHE_DTYPE, self.head_dim).cell_bytes
        else:
            raise ValueError(f"unknown KV-cache dtype {dtype!r}; expected one of {list(DTYPES)}")
        return self.num_layers * self.num_kv_heads * per_head


def parse_bytes(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1.5GB``, ``1073741824`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size like 8GiB, 512MiB, 2GB or a byte count, got {text!r}"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def plan(shape: ModelShape, kv_memory: int, tokens: int | None = None) -> dict[str, dict]:
    """``{dtype: {"bytes_per_token", "tokens"[, "bytes_for_tokens"][, "error"]}}``."""
    result: dict[str, dict] = {}
    for dtype in DTYPES:
        try:
            per_token = shape.bytes_per_token(dtype)
        except ValueError as error:
            result[dtype] = {"bytes_per_token": None, "tokens": None, "error": str(error)}
            continue
        row = {"bytes_per_token": per_token, "tokens": kv_memory // per_token}
        if tokens is not None:
            row["bytes_for_tokens"] = per_token * tokens
        result[dtype] = row
    return result


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_table(shape: ModelShape, kv_memory: int, rows: dict[str, dict], tokens: int | None) -> str:
    lines = [
        f"{shape.num_layers} layers x {shape.num_kv_heads} KV heads x head_dim {shape.head_dim}; "
        f"KV memory {kv_memory:,} B ({human(kv_memory)})",
        "",
    ]
    header = f"| {'dtype':<19} | bytes/token | {'tokens that fit':>15} | vs auto |"
    rule = f"|{'-' * 21}|------------:|{'-' * 16}:|--------:|"
    if tokens is not None:
        header += f" {f'{tokens:,} tokens':>16} |"
        rule += f"{'-' * 17}:|"
    lines += [header, rule]
    auto = rows["auto"]["bytes_per_token"]
    for dtype, row in rows.items():
        if row["bytes_per_token"] is None:
            lines.append(f"| {dtype:<19} | unsupported: {row['error']}")
            continue
        line = (
            f"| {dtype:<19} | {row['bytes_per_token']:>11,} | {row['tokens']:>15,} | "
            f"{auto / row['bytes_per_token']:>6.2f}x |"
        )
        if tokens is not None:
            line += f" {human(row['bytes_for_tokens']):>16} |"
        lines.append(line)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    path = pathlib.Path(args.config)
    if path.is_dir():
        path = path / "config.json"
    shape = ModelShape.from_config(json.loads(path.read_text()))
    rows = plan(shape, args.kv_memory, args.tokens)
    print(json.dumps(rows, indent=2) if args.json else format_table(shape, args.kv_memory, rows, args.tokens))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="KV-cache memory planner: bytes per token and tokens that fit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="Hugging Face config.json (or its model directory)")
    parser.add_argument(
        "--kv-memory", type=parse_bytes, default=parse_bytes("8GiB"), help="KV-cache memory (default 8GiB)"
    )
    parser.add_argument("--tokens", type=int, default=None, help="also print the memory N tokens need")
    parser.add_argument(
        "--json", action="store_true", help="print {dtype: {bytes_per_token, tokens}} as JSON"
    )
    parser.set_defaults(func=main)
