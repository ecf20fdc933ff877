"""``vllm-nf4kv report``: reconstruction quality of the shipped NF4 codec.

For synthetic head vectors (normal, uniform, heavy-tailed Student-t with 3
degrees of freedom, and normal with a few outlier channels, the shape of real
keys) and, with ``--model``/``--text``, for the real post-RoPE K and V of every
layer of a model, prints MSE, relative MSE (MSE / mean square), MAE, max
absolute error, mean and minimum cosine similarity per head vector, and the
compression ratio against a bf16 cache. Inputs are bf16 (what the cache
receives); errors are measured on the fp32 decoded vectors.

``--compare fp8,int4tok`` adds rows for other formats of
:mod:`vllm_nf4kv.tools.kv_formats` under the same inputs.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from vllm_nf4kv.format import KV_CACHE_DTYPE, format_for
from vllm_nf4kv.reference import decode_rows_rotated, encode_rows
from vllm_nf4kv.rotation import unrotate

BF16_BITS = 16
NUM_ROWS = 8192
OUTLIER_CHANNELS = (3, 17, 40, 41)  # in range for head_dim >= 48
OUTLIER_GAIN = 30.0


def synthetic(name: str, rows: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """Seeded synthetic head vectors ``[rows, head_dim]`` in bf16."""
    generator = torch.Generator().manual_seed(seed)
    if name == "normal":
        x = torch.randn(rows, head_dim, generator=generator)
    elif name == "uniform":
        x = torch.rand(rows, head_dim, generator=generator) * 2 - 1
    elif name == "student-t3":
        normal = torch.randn(rows, head_dim, generator=generator)
        chi2 = (torch.randn(rows, head_dim, 3, generator=generator) ** 2).sum(-1)
        x = normal / (chi2 / 3).sqrt()
    elif name == "outlier-channels":
        x = torch.randn(rows, head_dim, generator=generator)
        channels = [c for c in OUTLIER_CHANNELS if c < head_dim]
        x[:, channels] = x[:, channels] * OUTLIER_GAIN + OUTLIER_GAIN  # large and off-centre
    else:
        raise ValueError(f"unknown synthetic distribution {name!r}")
    return x.to(torch.bfloat16)


SYNTHETIC = ("normal", "uniform", "student-t3", "outlier-channels")


def shipped_row(head_dim: int, side: str = "key"):
    """The row ``--kv-cache-dtype nf4`` stores for keys (``side="key"``) or values."""
    return getattr(format_for(KV_CACHE_DTYPE, head_dim), side)


def shipped_round_trip(x: torch.Tensor, side: str = "key") -> torch.Tensor:
    """The shipped codec of keys or values (uncalibrated) back to fp32, original space."""
    fmt = shipped_row(x.shape[-1], side)
    return unrotate(decode_rows_rotated(encode_rows(x, fmt), fmt))


def _side(tensor_name: str) -> str:
    """Value rows for the model's V tensors, key rows for everything else (keys carry the error)."""
    return "value" if tensor_name.startswith("V") else "key"


def metrics(x: torch.Tensor, decoded: torch.Tensor, bits_per_value: float) -> dict[str, float]:
    """Error statistics of ``decoded`` against ``x`` (both ``[..., head_dim]``), in fp32."""
    x, decoded = x.float().flatten(0, -2), decoded.float().flatten(0, -2)
    err = decoded - x
    mse = float((err**2).mean())
    power = float((x**2).mean())
    cosine = torch.nn.functional.cosine_similarity(x, decoded, dim=-1, eps=1e-12)
    return {
        "mse": mse,
        "rel_mse": mse / power if power > 0 else math.nan,
        "mae": float(err.abs().mean()),
        "max_abs_err": float(err.abs().max()),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "bits_per_value": bits_per_value,
        "compression_vs_bf16": BF16_BITS / bits_per_value,
    }


def evaluate(tensors: dict[str, torch.Tensor], compare: list[str]) -> list[dict]:
    from vllm_nf4kv.tools.kv_formats import parse_format

    rows = []
    for name, x in tensors.items():
        head_dim, side = x.shape[-1], _side(name)
        row = shipped_row(head_dim, side)
        stats = metrics(x, shipped_round_trip(x, side), row.bits_per_value)
        rows.append({"tensor": name, "format": row.spec, **stats})
        for spec in compare:
            fmt = parse_format(spec)
            stats = metrics(x, fmt(x.float()), fmt.bits_per_value(head_dim))
            rows.append({"tensor": name, "format": spec, **stats})
    return rows


def real_kv(model_dir: str, text: str, tokens: int, ctx: int) -> dict[str, torch.Tensor]:
    """Post-RoPE K and V of all layers (bf16 ``[layers * heads * tokens, head_dim]``), and the worst layer."""
    from vllm_nf4kv.tools.hf_hooks import capture_kv, load_model, token_windows

    loaded = load_model(model_dir)
    captured = capture_kv(loaded.model, token_windows(loaded.tokenizer, text, tokens, ctx))
    keys = torch.stack([k for k, _ in captured.values()]).to(torch.bfloat16)  # [L, H, T, D]
    values = torch.stack([v for _, v in captured.values()]).to(torch.bfloat16)
    out = {"K (all layers)": keys.flatten(0, 2), "V (all layers)": values.flatten(0, 2)}
    for kind, data in (("K", keys), ("V", values)):
        side = _side(kind)
        rel = [
            float(((shipped_round_trip(x, side) - x.float()) ** 2).mean() / x.float().square().mean())
            for x in data
        ]
        worst = max(range(len(rel)), key=rel.__getitem__)
        out[f"{kind} (layer {worst}, worst)"] = data[worst].flatten(0, 1)
    return out


def format_table(rows: list[dict]) -> str:
    lines = [
        f"| {'tensor':<24} | {'format':<18} | {'MSE':>9} | {'rel MSE':>8} | {'MAE':>8} | {'max err':>8} "
        f"| cos mean | cos min | bits | vs bf16 |",
        f"|{'-' * 26}|{'-' * 20}|{'-' * 10}:|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:"
        f"|---------:|--------:|-----:|--------:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tensor']:<24} | {r['format']:<18} | {r['mse']:9.3e} | {r['rel_mse']:8.5f} "
            f"| {r['mae']:8.4f} "
            f"| {r['max_abs_err']:8.4f} | {r['cosine_mean']:8.5f} | {r['cosine_min']:7.4f} "
            f"| {r['bits_per_value']:4.2f} | {r['compression_vs_bf16']:6.2f}x |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if (args.model is None) != (args.text is None):
        raise SystemExit("vllm-nf4kv report: --model and --text go together (K/V are captured on the text)")
    torch.set_num_threads(args.threads)
    tensors = {name: synthetic(name, NUM_ROWS, args.head_dim) for name in SYNTHETIC}
    if args.model is not None:
        tensors.update(real_kv(args.model, args.text, args.tokens, args.ctx))
    compare = [s.strip() for s in args.compare.split(",") if s.strip()] if args.compare else []
    rows = evaluate(tensors, compare)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="codec quality report: MSE, MAE, max error, cosine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--head-dim", type=int, default=64, help="synthetic head size (default 64)")
    parser.add_argument("--model", default=None, help="Hugging Face model directory: also report real K/V")
    parser.add_argument("--text", default=None, help="text the real K/V are computed on (with --model)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of --text to capture (default 1024)")
    parser.add_argument("--ctx", type=int, default=1024, help="window length for the capture (default 1024)")
    parser.add_argument("--compare", default=None, help="comma-separated extra formats, e.g. fp8,int4tok")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print a list of row objects as JSON")
    parser.set_defaults(func=main)
