"""Pad a model with silent KV heads so its heads split over 2 ranks, for tensor-parallel tests.

SmolLM2-135M has 9 query heads over 3 KV heads, which 2 does not divide, so
vLLM refuses ``--tensor-parallel-size 2`` on it. This adds
KV heads (and their group of query heads) whose ``q_proj``/``k_proj``/``v_proj``
rows and ``o_proj`` columns are zero: such a head attends uniformly over zero
values and its output is multiplied by zero, so the padded model computes
exactly what the original computes (same text, same logits up to the order of
floating-point sums), while each rank of ``--tensor-parallel-size 2`` owns 2 of
its 4 KV heads. Dropping heads instead would test another, much worse model
(far flatter next-token distributions). Deterministic, from the local asset in
a few seconds, nothing downloaded.

    python scripts/pad_kv_heads.py .assets/models/smollm2-135m .assets/models/smollm2-4kv
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

WEIGHTS = "model.safetensors"


def pad_heads(source: Path, out: Path, kv_heads: int) -> Path:
    """Write the padded model to ``out`` (idempotent: an existing one is kept)."""
    import torch
    from safetensors.torch import load_file, save_file

    if (out / "config.json").exists():
        return out
    config = json.loads((source / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    have = config["num_key_value_heads"]
    group = config["num_attention_heads"] // have
    if kv_heads < have:
        raise SystemExit(f"--kv-heads {kv_heads}: the model has {have} already (padding only adds)")
    extra_q, extra_kv = (kv_heads - have) * group * head_dim, (kv_heads - have) * head_dim

    def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([tensor, tensor.new_zeros(rows, tensor.shape[1])])

    padded: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(source / WEIGHTS).items():
        if name.endswith("self_attn.q_proj.weight"):
            tensor = pad_rows(tensor, extra_q)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            tensor = pad_rows(tensor, extra_kv)
        elif name.endswith("self_attn.o_proj.weight"):
            tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], extra_q)], dim=1)
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            raise SystemExit(f"{name}: models with attention biases are not handled")
        padded[name] = tensor.contiguous()

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in source.iterdir():
        if path.name not in (WEIGHTS, "config.json") and path.is_file():
            shutil.copy2(path, partial / path.name)
    config.update(head_dim=head_dim, num_attention_heads=kv_heads * group, num_key_value_heads=kv_heads)
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(padded, partial / WEIGHTS, metadata={"format": "pt"})
    partial.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a Llama-style model directory (safetensors)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads after padding (default 4)")
    args = parser.parse_args()
    print(f"wrote {pad_heads(args.source, args.out, args.kv_heads)}")


if __name__ == "__main__":
    main()
