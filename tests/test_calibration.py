"""Key smoothing calibration: the file, its lookup and refusals, and what an engine serves with it.

The engine tests run ``vllm-nf4kv calibrate``'s own code on SmolLM2 through an in-process
vLLM engine (the statistics come from vLLM's attention layers) and then serve with the
file: deterministic files, exact logits (``q · k`` is unchanged), prefix-cache hits equal
to cold runs, and a refusal at startup of a file made for another model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from vllm_nf4kv import calibration as cal
from vllm_nf4kv import calibration_measure as measure
from vllm_nf4kv.kv_transform import KVTransform, local_heads
from vllm_nf4kv.settings import CALIBRATION


def _layer(heads, head_dim, scale=None, error=0.01):
    zeros = [[0.0] * head_dim for _ in range(heads)]
    return {
        "num_kv_heads": heads,
        "head_dim": head_dim,
        "attention_error": error,
        "key_scale": scale if scale is not None else [[1.0] * head_dim for _ in range(heads)],
        "key_offset": zeros,
        "value_offset": zeros,
    }


def _file(tmp_path, fingerprint="abc", heads=2, head_dim=4, scale=None, errors=(0.01, 0.01)):
    """A file with one layer and two context lengths (2,048 and 4,096), with these attention errors."""
    name = "model.layers.0.self_attn.attn"
    data = {
        "version": cal.FILE_VERSION,
        "fingerprint": fingerprint,
        "model": "m",
        "contexts": [
            {"max_position": n, "layers": {name: _layer(heads, head_dim, scale, e)}}
            for n, e in zip((2048, 4096), errors, strict=True)
        ],
    }
    path = tmp_path / f"c-{fingerprint}-{errors[0]}-{errors[1]}.json"
    path.write_text(json.dumps(data))
    return path


class Config:
    """The fields of an hf_text_config the fingerprint reads."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


# ---------------------------------------------------------------- the statistic


def test_key_smoothing_is_the_fourth_root_ratio_with_unit_geomean():
    q2 = torch.tensor([[4.0, 1.0, 16.0, 1.0]], dtype=torch.float64)
    k2 = torch.tensor([[1.0, 1.0, 1.0, 16.0]], dtype=torch.float64)
    d = measure.key_smoothing(q2, k2)
    raw = torch.tensor([4.0, 1.0, 16.0, 1 / 16]) ** 0.25
    assert torch.allclose(d[0], raw / raw.log().mean().exp())
    assert math.isclose(float(d.log().mean().exp()), 1.0, rel_tol=1e-6)
    # a channel with no energy (unused) keeps d = 1 before the normalisation
    unused = measure.key_smoothing(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.equal(unused, torch.ones(1, 2))


@pytest.mark.parametrize("neox", [True, False])
def test_pair_means_do_not_move_with_rope(neox):
    """A pair's summed energy is the same at every position: what makes d hold at any context."""
    head_dim, rotary = 8, 6  # partial rotary: the last two channels are left alone
    pairs = measure.rope_pairs(head_dim, rotary, neox)
    assert sorted(pairs.tolist()) == list(range(head_dim)) and bool((pairs[pairs] == torch.arange(8)).all())
    assert pairs[6] == 6 and pairs[7] == 7
    x = torch.randn(100, head_dim, dtype=torch.float64)
    angle = torch.rand(100, 1, dtype=torch.float64) * 100
    first = torch.arange(head_dim)[pairs > torch.arange(head_dim)]
    second = pairs[first]
    turned = x.clone()
    cos, sin = angle.cos(), angle.sin()
    turned[:, first] = x[:, first] * cos - x[:, second] * sin
    turned[:, second] = x[:, first] * sin + x[:, second] * cos
    before = measure.pair_mean(x.square().sum(0), pairs)
    after = measure.pair_mean(turned.square().sum(0), pairs)
    assert torch.allclose(before, after)
    assert not torch.allclose(x.square().sum(0), turned.square().sum(0))


def _attention(q, k, v):
    """fp64 softmax attention of every query over every key: ``[Tq, H, D]``, ``[Tk, H, D]``."""
    weights = torch.einsum("qhd,khd->hqk", q, k).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


def test_transform_leaves_attention_unchanged():
    """Keys (k - c) * d read with q / d, values v - mu with mu added back: the same attention, exactly.

    Offsets as large as Qwen2's key bias (hundreds against a token part of a few): fp64 shows
    the identity itself, not a rounding.
    """
    gen = torch.Generator().manual_seed(0)
    d = torch.tensor([[0.5, 2.0, 1.0, 4.0]], dtype=torch.float64)
    c = torch.tensor([[300.0, -150.0, 40.0, 0.0]], dtype=torch.float64)
    mu = torch.tensor([[5.0, -2.0, 0.0, 9.0]], dtype=torch.float64)
    transform = KVTransform(d.float(), c.float(), mu.float(), num_heads=3)  # fp32, as a file gives
    q = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(7, 1, 4, generator=gen, dtype=torch.float64) + c
    v = torch.randn(7, 1, 4, generator=gen, dtype=torch.float64) + mu
    group = lambda x: x.repeat_interleave(3, 1)  # noqa: E731  (query heads per KV head)
    plain = _attention(q, group(k), group(v))
    stored_k, stored_v = (k - c) * d, v - mu  # KVTransform's arithmetic, kept in fp64 here
    served = _attention(q / d.repeat_interleave(3, 0), group(stored_k), group(stored_v))
    served = served + mu.repeat_interleave(3, 0)
    assert torch.allclose(plain, served, rtol=1e-9, atol=1e-9)
    # and in the served precision (fp32), as the backends run it
    served32 = _attention(transform.queries(q), group(transform.keys(k)), group(transform.values(v)))
    assert torch.allclose(plain.float(), transform.outputs(served32), rtol=1e-4, atol=1e-3)
    assert transform.keys(k).dtype == transform.values(v).dtype == torch.float32  # what the store takes
    assert not KVTransform(d, c * 0, mu * 0, 3).is_identity
    assert KVTransform(d * 0 + 1, c * 0, mu * 0, 3).is_identity


@pytest.mark.parametrize("neox", [True, False])
def test_rope_inverse_and_key_offsets_hold_at_every_position(neox):
    """``apply_rope`` undoes itself; the offset never makes a channel of the mean key range wider.

    A pair that barely turns over the positions gets its whole mean as offset; one that turns
    many times gets almost none; per channel, ``max_p |R(p) m - c| <= max_p |R(p) m|``.
    """
    head_dim, rotary, positions = 8, 8, 2048
    pairs = measure.rope_pair_channels(head_dim, rotary, neox)
    inv_freq = torch.tensor([1.0, 0.05, 1e-4, 1e-6], dtype=torch.float64)  # fast .. nearly still
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(positions, 1, head_dim, dtype=torch.float64)
    turned = measure.apply_rope(x, cos, sin, pairs)
    assert not torch.allclose(turned, x)
    assert torch.allclose(measure.apply_rope(turned, cos, sin, pairs, inverse=True), x, atol=1e-12)
    mean = torch.full((1, head_dim), 10.0, dtype=torch.float64)
    c = measure.key_offset(mean, cos, sin, pairs).double()
    path = measure.apply_rope(mean.expand(positions, 1, head_dim), cos, sin, pairs)  # R(p) m at each p
    assert bool(((path - c).abs().amax(0) <= path.abs().amax(0) + 1e-9).all())
    first, second = pairs
    still = torch.stack([first[3], second[3]])  # and shrinks where the pair barely turns
    assert bool(((path - c)[..., still].abs().amax(0) < 0.01 * path[..., still].abs().amax(0)).all())
    assert torch.allclose(c[0, first[3]], mean[0, 0], rtol=1e-2)  # nearly still: all of it
    assert torch.allclose(c[0, second[3]], mean[0, 0], rtol=1e-2)
    assert float(c[0, first[0]].abs()) < 0.1 and float(c[0, second[0]].abs()) < 0.1  # many turns: ~0


@pytest.mark.parametrize(
    ("local", "total", "rank", "size", "want"),
    [(3, 3, 0, 1, (0, 3)), (2, 4, 1, 2, (2, 4)), (1, 1, 1, 2, (0, 1)), (1, 2, 3, 4, (1, 2))],
)
def test_local_heads_follow_vllm_sharding(local, total, rank, size, want):
    heads = local_heads(local, total, rank, size)
    assert (heads.start, heads.stop) == want


def _samples(key_gain: torch.Tensor, query_gain: torch.Tensor, tokens: int = 128):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, 2, 64, generator=gen) * query_gain
    k = torch.randn(tokens, 1, 64, generator=gen) * key_gain
    v = torch.randn(tokens, 1, 64, generator=gen)
    sum_q2 = q.double().square().unflatten(1, (1, 2)).mean(2).sum(0)
    return measure.LayerSamples(0.125, None, [(q, k, v)]), sum_q2, k.double().square().sum(0)


def _statistics(samples, sum_q2, key_offset=None, value_mean=None):
    from vllm_nf4kv.tools.calibrate import LayerStatistics

    q, k, v = samples.windows[0]
    n = k.shape[0]
    zeros = torch.zeros(k.shape[1:])
    return LayerStatistics(
        sum_q2 / n,
        k.double().square().mean(0),
        k.double().mean(0),
        zeros if key_offset is None else key_offset,
        v.double().mean(0) if value_mean is None else value_mean,
    )


def test_calibrate_scores_smoothing_strengths_by_attention_error():
    """Outlier key channels the query barely reads: smoothing wins; nothing to smooth: none is kept."""
    from vllm_nf4kv.tools.calibrate import Transform, attention_error, best_smoothing, scored_windows

    gain = torch.ones(64)
    gain[[3, 35]] = 30.0  # a RoPE pair of huge key channels, as QK-norm models have
    samples, q2, _ = _samples(gain, 1.0 / gain)
    windows = scored_windows(samples)
    best, plain = best_smoothing(samples, windows, _statistics(samples, q2), False, None)
    key_scale = best.transform.key_scale
    assert best.transform.power > 0 and float(key_scale[0, 3]) < 1 < float(key_scale[0, 0])
    assert best.error < 0.5 * plain.error
    ones, zeros = torch.ones(1, 64), torch.zeros(1, 64)
    assert attention_error(samples, windows, Transform(ones, zeros, zeros)) == plain.error
    flat, q2, _ = _samples(torch.ones(64), torch.ones(64))
    stats = _statistics(flat, q2)
    equal = type(stats)(torch.ones(1, 64), torch.ones(1, 64), stats.key_mean, zeros, stats.value_mean)
    # equal statistics in every channel: every strength gives d = 1, ties keep the weaker
    assert best_smoothing(flat, scored_windows(flat), equal, False, None)[0].transform.power == 0.0
    # a gain within the margin is not taken: mild outliers, a few percent of error at best
    gain = torch.ones(64)
    gain[[3, 35]] = 1.5
    mild, q2, _ = _samples(gain, 1.0 / gain)
    best, _ = best_smoothing(mild, scored_windows(mild), _statistics(mild, q2), False, None)
    assert best.transform.power == 0.0 and torch.equal(best.transform.key_scale, torch.ones(1, 64))


@pytest.mark.parametrize("offsets", [False, True])
def test_ablation_smoothing_is_what_calibrate_stores(offsets):
    """``ablate``'s ``+kqw`` weights are the ``d`` calibrate stores, from the same statistics.

    Partial rotary (48 of 64 channels turn) and a channel the queries never read tell the
    servers' formula (vLLM's pairs, unused channels keep d = 1) from a neox-only one with a clamp.
    """
    from vllm_nf4kv.tools.calibrate import best_smoothing, scored_windows
    from vllm_nf4kv.tools.kv_calibration import AblationStats

    gain = torch.ones(64)
    gain[[3, 27]] = 30.0  # a RoPE pair of huge key channels (partner 3 + 48 / 2)
    query_gain = 1.0 / gain
    query_gain[60] = 0.0  # unused by every query
    samples, q2, _ = _samples(gain, query_gain)
    pairs = measure.rope_pairs(64, 48, True)
    stats = _statistics(samples, q2, key_offset=samples.windows[0][1].mean(0).float())
    stats = dataclasses.replace(stats, query_sq=measure.pair_mean(stats.query_sq, pairs))  # as calibrate()
    best, _ = best_smoothing(samples, scored_windows(samples), stats, offsets, pairs)
    assert best.transform.power > 0 and float(best.transform.key_scale[0, 60]) != 0
    n = samples.windows[0][1].shape[0]
    ablation = AblationStats(
        "t", n, n, 48, None, n,
        key_mean={0: stats.key_mean}, key_pre_mean={}, key_sq={0: stats.key_sq},
        query_sq={0: q2 / n}, value_sq={}, out_weight_sq={},
    )  # fmt: skip
    offset = stats.key_offset if offsets else None
    assert torch.equal(ablation.key_weights(0, offset, best.transform.power), best.transform.key_scale)


def test_calibrate_keeps_offsets_that_remove_a_key_bias():
    """Keys riding on a bias 50x their spread (Qwen2's first layers): offsets cut the error to a few %.

    Without a bias the offsets change next to nothing and are not kept (OFFSET_MARGIN).
    """
    from vllm_nf4kv.tools.calibrate import best_smoothing, choose_transform, scored_windows

    bias = torch.zeros(1, 64)
    bias[0, 10:20] = 50.0
    samples, q2, _ = _samples(torch.ones(64), torch.ones(64))
    q, k, v = samples.windows[0]
    biased = type(samples)(samples.scale, None, [(q, k + bias, v + 3.0)])
    windows = scored_windows(biased)
    stats = _statistics(biased, q2, key_offset=bias)
    without = best_smoothing(biased, windows, stats, False, None)
    chosen = choose_transform(biased, windows, stats, None, without)
    assert torch.equal(chosen.transform.key_offset, bias) and bool(chosen.transform.value_offset.any())
    assert chosen.error_ratio < 0.2 and chosen.attention_error < 0.05
    windows = scored_windows(samples)
    stats = _statistics(samples, q2, key_offset=k.mean(0).float(), value_mean=v.double().mean(0))
    without = best_smoothing(samples, windows, stats, False, None)
    chosen = choose_transform(samples, windows, stats, None, without)
    assert not bool(chosen.transform.key_offset.any()) and chosen.error_ratio == 1.0


def test_context_lengths_double_up_to_the_longest():
    from vllm_nf4kv.tools.calibrate import context_lengths

    assert context_lengths(32768) == [2048, 4096, 8192, 16384, 32768]
    assert context_lengths(3000) == [2048, 3000] and context_lengths(1024) == [1024]


# ---------------------------------------------------------------- the file and its lookup


def test_file_round_trip_and_refusals(tmp_path):
    path = _file(tmp_path, scale=[[1.0, 2.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]])
    loaded = cal.load(path)
    loaded.write(tmp_path / "again.json")
    assert cal.load(tmp_path / "again.json").to_json() == loaded.to_json()
    assert loaded.layer("model.layers.0.self_attn.attn", 2, 4).key_scale[0, 1] == 2.0
    with pytest.raises(ValueError, match="has no attention layer 'model.layers.9.self_attn.attn'"):
        loaded.layer("model.layers.9.self_attn.attn", 2, 4)
    with pytest.raises(ValueError, match="calibrated with 2 KV heads of head_dim 4, this model has 2 of 8"):
        loaded.layer("model.layers.0.self_attn.attn", 2, 8)
    with pytest.raises(ValueError, match="positive finite numbers shaped"):
        cal.load(_file(tmp_path, scale=[[1.0, -1.0, 1.0, 1.0], [1.0] * 4]))
    with pytest.raises(ValueError, match="does not exist"):
        cal.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not readable JSON"):
        cal.load(tmp_path / "bad.json")


def test_resolve_finds_the_default_file_and_refuses_another_models(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(CALIBRATION.env_var, raising=False)
    cal._resolve.cache_clear()
    config = Config(architectures=["LlamaForCausalLM"], num_hidden_layers=1, head_dim=4)
    fingerprint = cal.model_fingerprint(config)
    assert fingerprint != cal.model_fingerprint(
        Config(architectures=["LlamaForCausalLM"], num_hidden_layers=2)
    )
    none = cal.resolve({}, config)
    assert none.calibration is None and "vllm-nf4kv calibrate MODEL" in none.reason
    default = cal.default_path(fingerprint)
    default.parent.mkdir(parents=True)
    shutil.copy(_file(tmp_path, fingerprint=fingerprint), default)
    cal._resolve.cache_clear()
    assert cal.resolve({}, config).calibration.source == str(default)
    assert cal.resolve({"nf4kv": {"calibration": "none"}}, config).calibration is None
    other = _file(tmp_path, fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="was made for another model"):
        cal.resolve({"nf4kv": {"calibration": str(other)}}, config)
    monkeypatch.setenv(CALIBRATION.env_var, "none")
    assert cal.resolve({}, config).calibration is None  # the variable, when the config is silent
    assert cal.resolve({"nf4kv": {"calibration": None}}, config).calibration is None  # or null
    with pytest.raises(ValueError, match="must be a file path or"):
        cal.resolve({"nf4kv": {"calibration": 3}}, config)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp", "pytorch"])
def test_cpu_backend_serves_biased_keys_and_values_through_the_transform(kernels):
    """The nf4 CPU backend with a layer's calibration: keys and values riding on large biases.

    Against fp64 attention of the raw q, k, v (relative squared error): with the offsets the
    error is nf4's usual (measured 5.5e-6); without them 3.6e-3. A backend that forgot ``q / d``
    (d = 4 here: only the read side can undo it) gave 9.0e-4, one that forgot ``+ mu`` 1.0, one
    that stored ``v`` instead of ``v - mu`` 0.98 (each tried). The bound leaves 18x for other CPUs.
    """
    import types

    from vllm_nf4kv.backends.cpu_attn import NF4CPUAttentionImpl
    from vllm_nf4kv.backends.smoothing import LayerSmoothing
    from vllm_nf4kv.tools.calibrate import causal_attention

    heads, kv_heads, dim, block, tokens = 4, 2, 64, 16, 40
    gen = torch.Generator().manual_seed(0)
    key_bias = torch.randn(kv_heads, dim, generator=gen) * 40
    value_bias = torch.randn(kv_heads, dim, generator=gen) * 20
    q = torch.randn(tokens, heads, dim, generator=gen)
    k = torch.randn(tokens, kv_heads, dim, generator=gen) + key_bias
    v = torch.randn(tokens, kv_heads, dim, generator=gen) + value_bias
    exact = causal_attention(q.double(), k.double(), v.double(), dim**-0.5, None)
    layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    entry = cal.LayerCalibration(kv_heads, dim, torch.full((kv_heads, dim), 4.0), key_bias, value_bias)
    calibration = cal.Calibration("f", "m", "t", 0, 0, (0.0,), {2048: {layer.layer_name: entry}})

    def served(smoothing) -> torch.Tensor:
        from vllm.v1.attention.backends import cpu_attn

        with pytest.MonkeyPatch.context() as patch:  # vLLM's CPU impl reads the model's dtype, only that
            config = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.float32))
            patch.setattr(cpu_attn, "get_current_vllm_config", lambda: config)
            impl = NF4CPUAttentionImpl(heads, dim, dim**-0.5, kv_heads, None, None, "nf4")
        if not kernels:
            impl.kernels = None  # the PyTorch path, as where the kernels cannot be built
        impl.smoothing = smoothing
        cache = torch.zeros(4, kv_heads, block, impl.layout.cell_bytes, dtype=torch.uint8)
        impl.do_kv_cache_update(layer, k, v, cache, torch.arange(tokens))
        metadata = types.SimpleNamespace(
            num_actual_tokens=tokens, query_start_loc=torch.tensor([0, tokens], dtype=torch.int32),
            seq_lens=torch.tensor([tokens], dtype=torch.int32),
            block_table=torch.arange(4, dtype=torch.int32)[None], causal=True,
        )  # fmt: skip
        output = torch.zeros(tokens, heads * dim)
        impl.forward(layer, q, k, v, cache, metadata, output)
        return output.view(tokens, heads, dim).double()

    def error(output: torch.Tensor) -> float:
        return float((output - exact).square().sum() / exact.square().sum())

    calibrated = error(served(LayerSmoothing(calibration, heads, kv_heads, kv_heads, dim)))
    uncalibrated = error(served(LayerSmoothing(None, heads, kv_heads, kv_heads, dim)))
    print(f"relative attention error: calibrated {calibrated:.2e}, uncalibrated {uncalibrated:.2e}")
    assert calibrated < 1e-4 and uncalibrated > 10 * calibrated


def test_quality_gate_refuses_a_file_over_the_bound_with_the_way_out(tmp_path, monkeypatch):
    """A layer measured above MAX_ATTENTION_ERROR stops startup; a shorter context or the setting serve."""
    from vllm_nf4kv.settings import ACCEPT_QUALITY_RISK

    monkeypatch.delenv(CALIBRATION.env_var, raising=False)
    monkeypatch.delenv(ACCEPT_QUALITY_RISK.env_var, raising=False)
    cal._resolve.cache_clear()
    config = Config(architectures=["Qwen2ForCausalLM"], num_hidden_layers=1, head_dim=4)
    errors = (0.05, 3 * cal.MAX_ATTENTION_ERROR)
    path = _file(tmp_path, fingerprint=cal.model_fingerprint(config), errors=errors)
    settings = {"nf4kv": {"calibration": str(path)}}
    short = cal.resolve(settings, config, max_model_len=2048)
    assert short.calibration.context == 2048 and "largest attention error 0.0500" in short.reason
    with pytest.raises(ValueError) as refused:
        cal.resolve(settings, config, max_model_len=2049)  # positions up to 2,048: the 4,096 set
    message = str(refused.value)
    for part in (
        "nf4 KV cache refused",
        "model.layers.0.self_attn.attn 0.600",
        "contexts up to 4096",
        "--max-model-len 2048",
        "--kv-cache-dtype auto or fp8",
        ACCEPT_QUALITY_RISK.key,
    ):
        assert part in message, (part, message)
    accepted = {"nf4kv": {"calibration": str(path), ACCEPT_QUALITY_RISK.key: True}}
    assert "accepted by setting" in cal.resolve(accepted, config, max_model_len=4096).reason
    monkeypatch.setenv(ACCEPT_QUALITY_RISK.env_var, "1")
    assert cal.resolve(settings, config, max_model_len=4096).calibration.context == 4096
    monkeypatch.setenv(ACCEPT_QUALITY_RISK.env_var, "yes")
    with pytest.raises(ValueError, match="give 1, 0, or unset it"):
        cal.resolve(settings, config)
    with pytest.raises(ValueError, match="must be true or false"):
        cal.resolve({"nf4kv": {ACCEPT_QUALITY_RISK.key: "yes"}}, config)


def test_for_context_takes_the_shortest_set_that_covers_it(tmp_path):
    loaded = cal.load(_file(tmp_path, errors=(0.01, 0.02)))
    assert loaded.context == 0 and loaded.layers is loaded.by_context[4096]  # before a choice: the longest
    chosen = [loaded.for_context(n).context for n in (1, 2048, 2049, 4096, 100_000)]
    assert chosen == [2048, 2048, 4096, 4096, 4096]
    assert loaded.for_context(2048).layers["model.layers.0.self_attn.attn"].attention_error == 0.01


def test_an_older_file_version_is_refused_with_the_command(tmp_path):
    data = json.loads(_file(tmp_path).read_text())
    data["version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 1, this vllm-nf4kv reads 2 .* calibrate MODEL` again"):
        cal.load(tmp_path / "v1.json")


# ---------------------------------------------------------------- through vLLM (SmolLM2, in-process)

KV_BYTES = 64 * 2**20


def _engine(model_dir, calibration: str, **kwargs):
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        kv_cache_dtype="nf4",
        enforce_eager=True,
        kv_cache_memory_bytes=KV_BYTES,
        max_model_len=1024,
        seed=0,
        additional_config={"nf4kv": {"calibration": calibration}},
        **kwargs,
    )


@pytest.fixture(scope="module")
def calibrated(model_dir, tmp_path_factory):
    """SmolLM2's calibration, made twice by ``vllm-nf4kv calibrate``'s code (short: 2 windows of 512).

    With the margin off: SmolLM2's keys have no outlier channels, so with it no layer would be
    smoothed and every factor would be 1, which would show nothing about the statistics.
    """
    from vllm_nf4kv.tools import calibrate as tool

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tool, "SMOOTHING_MARGIN", float("inf"))
        first, second = (tool.calibrate(str(model_dir), tokens=1024, ctx=512, log=print) for _ in range(2))
    path = tmp_path_factory.mktemp("calibration") / "smollm2.json"
    first.write(path)
    return first, second, path


@pytest.mark.slow
def test_calibrate_is_deterministic_and_measured_by_vllm(calibrated, model_shape, model_dir):
    first, second, path = calibrated
    assert first.to_json() == second.to_json()
    names = [f"model.layers.{i}.self_attn.attn" for i in range(model_shape["layers"])]
    assert sorted(first.layers) == sorted(names)
    from transformers import AutoConfig

    assert first.fingerprint == cal.model_fingerprint(AutoConfig.from_pretrained(model_dir).get_text_config())
    assert sorted(first.by_context) == [2048, 4096, 8192]  # SmolLM2: max_position_embeddings 8,192
    shape = (model_shape["kv_heads"], model_shape["head_dim"])
    for layers in first.by_context.values():
        assert sorted(layers) == sorted(names)
        assert {layer.power for layer in layers.values()} <= set(measure.KEY_SMOOTHING_POWERS)
        for layer in layers.values():
            assert layer.key_scale.shape == layer.key_offset.shape == layer.value_offset.shape == shape
            assert torch.allclose(layer.key_scale.log().mean(-1), torch.zeros(shape[0]), atol=1e-5)
            # RoPE pairs (neox: i, i + D/2) share their d
            half = model_shape["head_dim"] // 2
            assert torch.equal(layer.key_scale[:, :half], layer.key_scale[:, half:])
            # a layer left unsmoothed is exactly d = 1 (skipped if it has no offsets); a smoothed one is not
            assert (layer.power == 0) == bool((layer.key_scale == 1).all())
            as_is = layer.power == 0 and not layer.key_offset.any() and not layer.value_offset.any()
            assert as_is == (layer.error_ratio == 1.0) and layer.error_ratio <= 1.0
            assert 0 < layer.attention_error < cal.MAX_ATTENTION_ERROR
    spread = torch.stack([layer.key_scale for layer in first.layers.values()])
    assert float(spread.max() / spread.min()) > 1.5  # a real per-channel statistic, not ones
    assert any(layer.value_offset.any() for layer in first.layers.values())
    assert cal.load(path).to_json() == first.to_json()


@pytest.mark.slow
def test_calibrated_engine_is_exact_and_prefix_hits_equal_cold_runs(
    calibrated, model_dir, moby_dick, tmp_path
):
    from vllm import SamplingParams

    # SmolLM2's own calibration smooths few layers, if any (no outlier key channels); a file with
    # strong factors everywhere makes the transform's exactness and its effect visible
    data = calibrated[0].to_json()
    gen = torch.Generator().manual_seed(1)
    for context in data["contexts"]:
        for layer in context["layers"].values():
            shape = (layer["num_kv_heads"], layer["head_dim"])
            d = torch.rand(shape, generator=gen) * 3.5 + 0.25
            layer["key_scale"] = (d / d.log().mean(-1, keepdim=True).exp()).tolist()
            layer["key_offset"] = (torch.randn(shape, generator=gen) * 2).tolist()
            layer["value_offset"] = (torch.randn(shape, generator=gen) * 0.5).tolist()
    path = tmp_path / "strong.json"
    path.write_text(json.dumps(data))
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)
    prompt = moby_dick[:1500]

    def run(llm):
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        return out.token_ids, [step[t].logprob for t, step in zip(out.token_ids, out.logprobs, strict=True)]

    llm = _engine(model_dir, str(path), enable_prefix_caching=True)
    cold = run(llm)
    hit = run(llm)  # the prompt's blocks now come from the prefix cache
    assert hit == cold
    del llm
    plain = run(_engine(model_dir, cal.DISABLED))
    assert plain[1] != cold[1]  # the transform reaches the cache: other codes, other logprobs


def test_a_file_without_this_models_layer_names_is_refused_at_startup(model_dir, model_shape, tmp_path):
    """The right model's file under other layer names (another vLLM's naming, a multimodal prefix).

    Before: accepted at startup; the engine died on its first request (the layers were looked
    up on their first call). Now every layer is looked up once the weights are loaded.
    """
    from transformers import AutoConfig

    fingerprint = cal.model_fingerprint(AutoConfig.from_pretrained(model_dir).get_text_config())
    kv_heads, dim = model_shape["kv_heads"], model_shape["head_dim"]
    zeros = torch.zeros(kv_heads, dim)
    entry = cal.LayerCalibration(kv_heads, dim, torch.ones(kv_heads, dim), zeros, zeros, 0.0, 1.0, 0.01)
    layers = {f"language_model.model.layers.{i}.self_attn.attn": entry for i in range(model_shape["layers"])}
    path = tmp_path / "renamed.json"
    cal.Calibration(fingerprint, "smollm2", "t", 0, 0, (0.0,), {8192: layers}).write(path)
    with pytest.raises(Exception, match="has no attention layer 'model.layers.0.self_attn.attn'"):
        _engine(model_dir, str(path))


@pytest.mark.slow
def test_another_models_calibration_is_refused_at_startup(calibrated, model_dir, tmp_path):
    data = calibrated[0].to_json()
    data["fingerprint"] = "0" * 16
    data["model"] = "some/other-model"
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps(data))
    with pytest.raises(Exception, match="was made for another model \\(some/other-model"):
        _engine(model_dir, str(wrong))
