"""The ``vllm-nf4kv`` tools: plan (hand arithmetic), report, ablate (real model, short), kv_formats.

Figures of the shipped nf4 format come from :func:`vllm_nf4kv.format.format_for`,
so a format change needs no edit here; everything else (bf16, fp8, vLLM's
``int4_per_token_head``, the ablation specs) is hand arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from vllm_nf4kv import cli
from vllm_nf4kv.format import DEFAULT_SEARCH_STEPS, KV_CACHE_DTYPE, RowFormat, format_for
from vllm_nf4kv.reference import fake_quantize_rows, nf4_encode, nf4_midpoints
from vllm_nf4kv.tools import kv_formats
from vllm_nf4kv.tools.ablate import parse_candidate
from vllm_nf4kv.tools.plan import ModelShape, parse_bytes

GIB = 2**30


def nf4_cell(head_dim: int) -> int:
    """Bytes the shipped nf4 format stores per token and KV head (K and V)."""
    return format_for(KV_CACHE_DTYPE, head_dim).cell_bytes


def run_json(capsys, *argv: str):
    assert cli.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def write_config(tmp_path: Path, **config) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


# ---------------------------------------------------------------- plan

SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}


def test_plan_smollm2_hand_arithmetic(capsys, tmp_path):
    rows = run_json(capsys, "plan", "--config", write_config(tmp_path, **SMOLLM2), "--json")
    assert list(rows) == ["auto", "fp8", "int4_per_token_head", "nf4"]
    layers_heads = 30 * 3
    expected = {
        "auto": layers_heads * 2 * 64 * 2,  # K and V, 64 values, 2 bytes (bf16): 23,040
        "fp8": layers_heads * 2 * 64,  # 11,520
        "int4_per_token_head": layers_heads * 2 * (32 + 4),  # codes + fp32 scale: 6,480
        "nf4": layers_heads * nf4_cell(64),
    }
    for dtype, per_token in expected.items():
        assert rows[dtype] == {"bytes_per_token": per_token, "tokens": 8 * GIB // per_token}
    # the budget: never more bytes than vLLM's int4_per_token_head
    assert rows["nf4"]["bytes_per_token"] <= rows["int4_per_token_head"]["bytes_per_token"]


def test_plan_65b_example(capsys, tmp_path):
    # the original 65B example: 80 layers, 64 heads (no GQA), head_dim 128, a 2048-token sequence
    config = write_config(tmp_path, num_hidden_layers=80, num_attention_heads=64, hidden_size=8192)
    rows = run_json(capsys, "plan", "--config", config, "--kv-memory", "8GiB", "--tokens", "2048", "--json")
    assert rows["auto"]["bytes_per_token"] == 80 * 64 * 2 * 128 * 2 == 2_621_440
    assert rows["auto"]["bytes_for_tokens"] == 5 * GIB
    assert rows["fp8"]["bytes_for_tokens"] == 5 * GIB // 2
    assert rows["int4_per_token_head"]["bytes_per_token"] == 80 * 64 * 2 * (64 + 4) == 696_320
    nf4 = 80 * 64 * nf4_cell(128)
    assert rows["nf4"]["bytes_per_token"] == nf4 <= 696_320
    assert rows["nf4"]["tokens"] == 8 * GIB // nf4 and rows["nf4"]["bytes_for_tokens"] == 2048 * nf4


def test_plan_config_fallbacks(tmp_path):
    no_kv_heads = ModelShape.from_config(
        {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}
    )
    assert (no_kv_heads.num_kv_heads, no_kv_heads.head_dim, no_kv_heads.auto_bytes) == (4, 64, 2)
    fp32 = ModelShape.from_config({**SMOLLM2, "torch_dtype": "float32"})
    assert fp32.bytes_per_token("auto") == 30 * 3 * 2 * 64 * 4
    nested = ModelShape.from_config({"text_config": SMOLLM2, "architectures": ["X"]})
    assert nested.bytes_per_token("nf4") == 30 * 3 * nf4_cell(64)
    assert nested.bytes_per_token("auto") == 30 * 3 * 2 * 64 * 2  # bf16 unless the config says otherwise
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelShape.from_config({"num_attention_heads": 4})


def test_plan_unsupported_head_dim(capsys, tmp_path):
    config = write_config(
        tmp_path, num_hidden_layers=2, num_attention_heads=4, hidden_size=360
    )  # head_dim 90
    rows = run_json(capsys, "plan", "--config", config, "--json")
    assert rows["nf4"]["bytes_per_token"] is None and "multiple of 16" in rows["nf4"]["error"]
    assert rows["fp8"]["bytes_per_token"] == 2 * 4 * 2 * 90
    assert cli.main(["plan", "--config", config]) == 0
    assert "unsupported" in capsys.readouterr().out


def test_plan_table_and_sizes(capsys, tmp_path):
    assert cli.main(["plan", "--config", write_config(tmp_path, **SMOLLM2), "--kv-memory", "64MiB"]) == 0
    out = capsys.readouterr().out
    nf4_row = next(line for line in out.splitlines() if line.startswith("| nf4"))
    assert f"{64 * 2**20 // (30 * 3 * nf4_cell(64)):,}" in nf4_row, out
    assert parse_bytes("8GiB") == 8 * GIB and parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1024") == 1024
    with pytest.raises(Exception, match="8GiB"):
        parse_bytes("lots")


# ---------------------------------------------------------------- kv_formats

HEAD_DIMS = [16, 64, 96, 128]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, DEFAULT_SEARCH_STEPS])
def test_nf4_variant_equals_shipped_codec(head_dim, dtype, steps):
    group = format_for(KV_CACHE_DTYPE, head_dim).key.group_size
    x = (torch.randn(3, 50, head_dim) * 4).to(dtype)
    x[0, 0, 1] = 1e5
    variant = kv_formats.parse_format(f"nf4-g{group}-ue5m3-s{steps}")
    row = RowFormat(head_dim, group, steps)
    assert torch.equal(variant(x), fake_quantize_rows(x, row))
    assert variant.bits_per_value(head_dim) == row.bits_per_value


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("groups", [4, 8, 16])
@pytest.mark.parametrize("bits", [1, 3, 5, 6, 7, 8])
def test_two_level_variants_are_the_reference_codec(head_dim, groups, bits):
    """Every ``nf4-gG-rB-sN`` row is the reference's TWO_LEVEL row, ladder (r6..r8) included.

    ``-norot`` is the same row quantized without the rotation (the reference's quantize and
    decode, no second codec).
    """
    from vllm_nf4kv.format import ScaleScheme
    from vllm_nf4kv.reference import decode_rows_rotated, quantize_rows

    group, steps = head_dim // groups, 2 ** (bits - 1) + 1
    x = torch.randn(3, 40, head_dim, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 0, 1] = 1e4  # one group far above the others: its rung sits low on the ladder
    x[1, :, :group] *= 1e-3
    row = RowFormat(head_dim, group, steps, ScaleScheme.TWO_LEVEL, bits)
    variant = kv_formats.parse_format(f"nf4-g{group}-r{bits}-s{steps}")
    assert variant.spec == row.spec and variant.bits_per_value(head_dim) == row.bits_per_value
    assert torch.equal(variant(x), fake_quantize_rows(x, row))
    unrotated = kv_formats.parse_format(f"nf4-g{group}-r{bits}-s{steps}-norot")(x)
    assert torch.equal(unrotated, decode_rows_rotated(quantize_rows(x, row), row))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_shipped_spec_is_what_nf4_stores(head_dim):
    """The specs the tools call shipped round-trip exactly as the stored K and V rows do."""
    layout = format_for(KV_CACHE_DTYPE, head_dim)
    assert kv_formats.shipped_spec(head_dim) == f"{layout.key.spec}/{layout.value.spec}"
    x = torch.randn(4, 40, head_dim, generator=torch.Generator().manual_seed(head_dim)) * 3
    x[0, 0, 0] = 1e4  # an outlier: a group scale far from the others
    stored = parse_candidate("nf4")
    for row, side in ((layout.key, stored.key), (layout.value, stored.value)):
        emulated = kv_formats.parse_format(row.spec)
        assert torch.equal(emulated(x), fake_quantize_rows(x, row))
        assert torch.equal(side(x), fake_quantize_rows(x, row))
        assert emulated.bits_per_value(head_dim) == side.bits_per_value(head_dim) == row.bits_per_value
        # another scale search rounds differently: the check above can tell formats apart
        other = dataclasses.replace(row, search_steps=1 if row.search_steps > 1 else 2)
        assert not torch.equal(emulated(x), fake_quantize_rows(x, other))


def test_ablation_nf4_candidate_stores_what_a_calibrated_server_stores():
    """``ablate``'s ``nf4`` with a calibration: keys ``q((k - c) d) / d + c``, values ``q(v - mu) + mu``.

    With a coarse stand-in quantizer (rounding) the hook's output is that arithmetic exactly;
    without the offsets it would round the biased rows instead.
    """
    from vllm_nf4kv.calibration import LayerCalibration
    from vllm_nf4kv.tools.kv_calibration import make_hook

    gen = torch.Generator().manual_seed(0)
    heads, dim = 2, 8
    d = torch.rand(heads, dim, generator=gen) + 0.5
    c, mu = torch.randn(heads, dim, generator=gen) * 30, torch.randn(heads, dim, generator=gen) * 10
    served = {3: LayerCalibration(heads, dim, d, c, mu)}
    hook = make_hook(torch.round, torch.round, frozenset(), None, served=served)
    query = torch.randn(1, 4, 5, dim, generator=gen)  # HF layout [batch, heads, tokens, dim]
    key = torch.randn(1, heads, 5, dim, generator=gen) * 2 + c[None, :, None, :]
    value = torch.randn(1, heads, 5, dim, generator=gen) * 2 + mu[None, :, None, :]
    key_hat, value_hat = hook(3, query, key, value)
    per_head = lambda x: x[None, :, None, :]  # noqa: E731
    want_key = torch.round((key - per_head(c)) * per_head(d)) / per_head(d) + per_head(c)
    assert torch.equal(key_hat, want_key)
    assert torch.equal(value_hat, torch.round(value - per_head(mu)) + per_head(mu))
    assert not torch.equal(key_hat, torch.round(key * per_head(d)) / per_head(d))


@pytest.mark.parametrize("options", [("kqw",), ("koff", "kqw")])
def test_ablation_key_weights_are_applied_to_what_the_offset_leaves(options):
    """``+kqw`` stores ``q((k - c) d) / d`` with ``d`` for ``E[(k - c)^2]``, as a server would."""
    from vllm_nf4kv.tools.kv_calibration import AblationStats, make_hook

    gen = torch.Generator().manual_seed(1)
    heads, dim = 2, 8
    mean = torch.randn(heads, dim, generator=gen) * 5
    key_sq = mean.square() + torch.rand(heads, dim, generator=gen)
    query_sq = torch.rand(heads, dim, generator=gen)
    stats = AblationStats(
        "t", 0, 1, dim, None, 64, key_mean={0: mean}, key_pre_mean={}, key_sq={0: key_sq},
        query_sq={0: query_sq * 4}, value_sq={}, out_weight_sq={},
    )  # fmt: skip
    hook = make_hook(torch.round, torch.round, frozenset(options), stats)
    key = torch.randn(1, heads, 5, dim, generator=gen) * 3 + mean[None, :, None, :]
    key_hat, _ = hook(0, torch.randn(1, 4, 5, dim, generator=gen), key, torch.zeros(1, heads, 5, dim))
    c = mean if "koff" in options else None
    d = stats.key_weights(0, c, 0.25)[None, :, None, :]
    stored = key if c is None else key - c[None, :, None, :]
    assert torch.equal(key_hat, torch.round(stored * d) / d)
    if c is not None:  # the weights are those of the centred keys
        assert not torch.equal(d, stats.key_weights(0, None, 0.25)[None, :, None, :])


def test_bucketize_matches_reference_encoder():
    x = torch.cat([torch.linspace(-1, 1, 10001), nf4_midpoints(), torch.tensor([-1.0, 0.0, 1.0])])
    assert torch.equal(torch.bucketize(x, nf4_midpoints()), nf4_encode(x).long())


@pytest.mark.parametrize(
    ("spec", "bits64", "bits128"),
    [
        ("fp32", 32, 32),
        ("bf16", 16, 16),
        ("fp8", 8, 8),
        ("int4tok", 4.5, 4.25),
        ("nf4-g64-fp32-s1-norot", 4.5, 4.5),
        ("nf4-g32-fp16-s4", 4.5, 4.5),
        ("nf4-g16-e4m3-s4", 4.5, 4.5),
        ("nf4-g32-ue5m3-s4", 4.25, 4.25),
        ("nf4-g8-r3-s4", 4.5, 4.4375),  # 1 + 8 * 3 / 8 scale bytes at 64; 1 + 16 * 3 / 8 at 128
        ("nf4-g16-r4-s4", 4.375, 4.3125),
    ],
)
def test_bits_per_value(spec, bits64, bits128):
    fmt = kv_formats.parse_format(spec)
    assert fmt.bits_per_value(64) == bits64 and fmt.bits_per_value(128) == bits128


@pytest.mark.parametrize(
    "spec",
    [
        "fp8",
        "int4tok",
        "nf4-g64-fp32-s1-norot",
        "nf4-g32-fp16-s4",
        "nf4-g16-e4m3-s4",
        "nf4-g16-ue4m4-s4",
        "nf4-g8-r3-s8",
        "nf4-g16-ue5m3-s4-norot",
    ],
)
def test_formats_round_trip_sanely(spec):
    x = torch.randn(2, 3, 200, 64, generator=torch.Generator().manual_seed(0))
    x[..., 5] += 8  # an off-centre outlier channel, as in real keys
    y = kv_formats.parse_format(spec)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
    assert float(((y - x) ** 2).mean() / (x**2).mean()) < 0.03
    bad = x.clone()
    bad[0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    assert bool(torch.isfinite(kv_formats.parse_format(spec)(bad)).all())


def test_int4_emulation_details():
    fmt = kv_formats.parse_format("int4tok")
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    y = fmt(x)
    # 16 levels per row: the rotated round trip takes at most 16 distinct values per row
    # (up to the fp32 noise of rotating back and forth, hence clusters, not exact values)
    rotated = kv_formats.rotate(y) * 8
    clusters = [1 + int((r.sort().values.diff() > 1e-3).sum()) for r in rotated]
    assert max(clusters) <= 16 and min(clusters) >= 8
    assert float(((y - x) ** 2).mean()) < 0.02
    fp8 = kv_formats.parse_format("fp8")(torch.tensor([1000.0, -3.3, 0.0]))
    assert fp8.tolist() == [448.0, -3.25, 0.0]


@pytest.mark.parametrize("spec", ["nf4-g16-xx-s4", "nf4-g15-ue5m3-s4", "nf4-g16-ue5m3-s0", "int8", "nf4-g16"])
def test_bad_format_specs(spec):
    with pytest.raises(ValueError):
        kv_formats.parse_format(spec)


def test_candidate_specs():
    from vllm_nf4kv.tools.ablate import DEFAULT_CANDIDATES, parse_candidate

    split = parse_candidate("nf4-g16-ue5m3-s4/nf4-g32-ue5m3-s4+koff+kqw")
    assert (split.key.spec, split.value.spec, sorted(split.options)) == (
        "nf4-g16-ue5m3-s4",
        "nf4-g32-ue5m3-s4",
        ["koff", "kqw"],
    )
    assert split.bits_per_value(64) == (4.5 + 4.25) / 2
    assert parse_candidate("fp8").value.spec == "fp8"
    for spec in DEFAULT_CANDIDATES:
        parse_candidate(spec)
    with pytest.raises(ValueError, match="option"):
        parse_candidate("fp8+smooth")
    with pytest.raises(ValueError, match="at most one key offset"):
        parse_candidate("fp8+koff+kpre")


def test_rope_helper_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from vllm_nf4kv.tools.kv_calibration import apply_rope

    config = LlamaConfig(hidden_size=192, num_attention_heads=3, head_dim=64, max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(1, 3, 300, 64)
    positions = torch.arange(300)
    cos, sin = rotary(x, positions[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(apply_rope(x, positions, rotary.inv_freq), expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(
        apply_rope(expected, positions, rotary.inv_freq, inverse=True), x, atol=2e-4, rtol=1e-4
    )
    one = x[..., :1, :]  # one vector (a mean key) turned to every position, as +kpre does
    assert torch.equal(
        apply_rope(one, positions, rotary.inv_freq), apply_rope(one.expand_as(x), positions, rotary.inv_freq)
    )


def test_low_frequency_pairs():
    from vllm_nf4kv.tools.kv_calibration import AblationStats

    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2).double() / 64)
    calibration = AblationStats("t", 0, 1, 64, inv_freq, 2048, {}, {}, {}, {}, {}, {})
    mask = calibration.low_frequency_pairs()
    assert mask.shape == (64,) and torch.equal(mask[:32], mask[32:])
    slow = inv_freq * 2048 <= torch.pi / 3
    assert torch.equal(mask[:32], slow) and 0 < int(slow.sum()) < 32
    assert bool(slow[-1]) and not bool(slow[0])  # the last pairs turn slowest


# ---------------------------------------------------------------- report


def test_report_synthetic(capsys):
    rows = run_json(capsys, "report", "--json", "--compare", "int4tok")
    tensors = {r["tensor"] for r in rows}
    assert tensors == {"normal", "uniform", "student-t3", "outlier-channels"}
    shipped = {r["tensor"]: r for r in rows if r["format"] == format_for(KV_CACHE_DTYPE, 64).key.spec}
    assert set(shipped) == tensors
    shipped_bits = format_for(KV_CACHE_DTYPE, 64).key.bits_per_value
    for name, row in shipped.items():
        assert set(row) >= {
            "mse",
            "rel_mse",
            "mae",
            "max_abs_err",
            "cosine_mean",
            "cosine_min",
            "compression_vs_bf16",
        }
        assert row["compression_vs_bf16"] == pytest.approx(16 / shipped_bits)
        assert row["cosine_mean"] > 0.99, name
        assert row["max_abs_err"] >= row["mae"] > 0
    assert shipped["normal"]["rel_mse"] < 0.01
    assert cli.main(["report"]) == 0
    assert "outlier-channels" in capsys.readouterr().out


# ---------------------------------------------------------------- real model (short settings)


@pytest.fixture(scope="module")
def texts(model_dir) -> Path:
    return model_dir.parents[1] / "texts"


@pytest.mark.slow
def test_hooked_attention_is_the_stock_model(model_dir, texts):
    from transformers import AutoModelForCausalLM

    from vllm_nf4kv.tools.hf_hooks import load_model, perplexity, token_windows

    loaded = load_model(model_dir)
    stock = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    windows = token_windows(loaded.tokenizer, texts / "moby_dick.txt", 256, 128)
    with torch.inference_mode():
        assert torch.equal(loaded.model(windows[:1]).logits, stock.eval()(windows[:1]).logits)
    assert perplexity(loaded.model, windows) == perplexity(stock, windows)
    with pytest.raises(ValueError, match="--tokens"):
        token_windows(loaded.tokenizer, texts / "moby_dick.txt", 100, 128)


@pytest.mark.slow
def test_report_real_kv(capsys, model_dir, texts):
    argv = [
        "report",
        "--json",
        "--model",
        str(model_dir),
        "--text",
        str(texts / "sotu_2000_2021.txt"),
        "--tokens",
        "128",
        "--ctx",
        "128",
    ]
    rows = run_json(capsys, *argv)
    names = [r["tensor"] for r in rows]
    assert "K (all layers)" in names and "V (all layers)" in names
    assert any(n.startswith("K (layer") for n in names) and any(n.startswith("V (layer") for n in names)
    for row in rows:
        assert row["cosine_mean"] > 0.97


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ablate_end_to_end(capsys, model_dir, texts):
    shipped = kv_formats.shipped_spec(64)
    plain = "nf4-g64-fp32-s1-norot"
    report = run_json(
        capsys,
        "ablate",
        "--model",
        str(model_dir),
        "--text",
        str(texts / "moby_dick.txt"),
        "--tokens",
        "512",
        "--ctx",
        "256",
        "--json",
        "--threads",
        "1",
        "--calib-text",
        str(texts / "sotu_2000_2021.txt"),
        "--calib-tokens",
        "256",
        "--candidates",
        f"fp32,{plain},{shipped},nf4,fp32+koff,fp32+kpre",
        "--calibration",
        "none",
    )
    assert report["tokens"] == 512 and report["ctx"] == 256 and report["shipped"] == shipped
    assert report["calibration"]["text"].endswith("sotu_2000_2021.txt")
    delta = {r["candidate"]: r["delta_ppl_pct"] for r in report["results"]}
    assert delta["fp32"] == 0.0  # the baseline through the hook: bit-identical
    assert abs(delta["fp32+koff"]) < 0.01  # a fixed key offset leaves softmax unchanged
    assert abs(delta["fp32+kpre"]) < 0.01  # subtracted and added back
    # plain NF4 costs ~+12% here; the shipped codec's ΔPPL on 510 predictions is within about
    # +-1% of zero (code-flip luck, see docs/format.md), so the margin is wide
    assert delta[plain] > delta[shipped] + 5
    bits = {r["candidate"]: r["bits_per_value"] for r in report["results"]}
    assert bits[plain] == 4.5  # 32 bytes of codes and one fp32 scale per 64 values
    assert bits[shipped] == bits["nf4"] == format_for(KV_CACHE_DTYPE, 64).bits_per_value
    # `nf4` is the stored codec itself, uncalibrated here: the same ΔPPL as its emulation
    assert delta["nf4"] == delta[shipped] and report["stored_calibration"].startswith("uncalibrated")


@pytest.mark.slow
def test_ablate_skips_calibrated_candidates_without_calib_text(capsys, model_dir, texts):
    assert (
        cli.main(
            [
                "ablate",
                "--model",
                str(model_dir),
                "--text",
                str(texts / "moby_dick.txt"),
                "--tokens",
                "128",
                "--ctx",
                "128",
                "--threads",
                "1",
                "--candidates",
                "fp8,fp8+koff",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| fp8 " in out and "skipped" in out and "fp8+koff" in out
    with pytest.raises(ValueError, match="unknown KV format"):
        cli.main(["ablate", "--model", str(model_dir), "--text", "x", "--candidates", "fp7"])
