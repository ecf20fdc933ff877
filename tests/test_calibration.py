"""Key smoothing calibration: the file, its lookup and refusals, and what an engine serves with it.

The engine tests run ``vllm-nf4kv calibrate``'s own code on SmolLM2 through an in-process
vLLM engine (the statistics come from vLLM's attention layers) and then serve with the
file: deterministic files, exact logits (``q · k`` is unchanged), prefix-cache hits equal
to cold runs, and a refusal at startup of a file made for another model.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from vllm_nf4kv import calibration as cal
from vllm_nf4kv.settings import CALIBRATION


def _file(tmp_path, fingerprint="abc", heads=2, head_dim=4, scale=None):
    scale = scale if scale is not None else [[1.0] * head_dim for _ in range(heads)]
    data = {
        "version": cal.FILE_VERSION,
        "fingerprint": fingerprint,
        "model": "m",
        "layers": {
            "model.layers.0.self_attn.attn": {"num_kv_heads": heads, "head_dim": head_dim, "key_scale": scale}
        },
    }
    path = tmp_path / "c.json"
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
    d = cal.key_smoothing(q2, k2)
    raw = torch.tensor([4.0, 1.0, 16.0, 1 / 16]) ** 0.25
    assert torch.allclose(d[0], raw / raw.log().mean().exp())
    assert math.isclose(float(d.log().mean().exp()), 1.0, rel_tol=1e-6)
    # a channel with no energy (unused) keeps d = 1 before the normalisation
    unused = cal.key_smoothing(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.equal(unused, torch.ones(1, 2))


@pytest.mark.parametrize("neox", [True, False])
def test_pair_means_do_not_move_with_rope(neox):
    """A pair's summed energy is the same at every position: what makes d hold at any context."""
    head_dim, rotary = 8, 6  # partial rotary: the last two channels are left alone
    pairs = cal.rope_pairs(head_dim, rotary, neox)
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
    before = cal.pair_mean(x.square().sum(0), pairs)
    after = cal.pair_mean(turned.square().sum(0), pairs)
    assert torch.allclose(before, after)
    assert not torch.allclose(x.square().sum(0), turned.square().sum(0))


def test_smoothing_leaves_logits_unchanged():
    smoother = cal.KeySmoother(torch.tensor([[0.5, 2.0, 1.0, 4.0]]), num_heads=3)
    q, k = torch.randn(5, 3, 4), torch.randn(7, 1, 4)
    plain = torch.einsum("qhd,kd->hqk", q, k[:, 0])
    smoothed = torch.einsum("qhd,kd->hqk", smoother.queries(q), smoother.keys(k)[:, 0])
    assert torch.allclose(plain, smoothed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("local", "total", "rank", "size", "want"),
    [(3, 3, 0, 1, (0, 3)), (2, 4, 1, 2, (2, 4)), (1, 1, 1, 2, (0, 1)), (1, 2, 3, 4, (1, 2))],
)
def test_local_heads_follow_vllm_sharding(local, total, rank, size, want):
    heads = cal.local_heads(local, total, rank, size)
    assert (heads.start, heads.stop) == want


def _samples(key_gain: torch.Tensor, query_gain: torch.Tensor, tokens: int = 128):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, 2, 64, generator=gen) * query_gain
    k = torch.randn(tokens, 1, 64, generator=gen) * key_gain
    v = torch.randn(tokens, 1, 64, generator=gen)
    sum_q2 = q.double().square().unflatten(1, (1, 2)).mean(2).sum(0)
    return cal.LayerSamples(0.125, None, [(q, k, v)]), sum_q2, k.double().square().sum(0)


def test_calibrate_scores_smoothing_strengths_by_attention_error():
    """Outlier key channels the query barely reads: smoothing wins; nothing to smooth: none is kept."""
    from vllm_nf4kv.tools.calibrate import attention_error, choose_smoothing, scored_windows

    gain = torch.ones(64)
    gain[[3, 35]] = 30.0  # a RoPE pair of huge key channels, as QK-norm models have
    samples, q2, k2 = _samples(gain, 1.0 / gain)
    power, key_scale, ratio = choose_smoothing(samples, q2, k2)
    assert power > 0 and float(key_scale[0, 3]) < 1 < float(key_scale[0, 0]) and ratio < 0.5
    windows = scored_windows(samples)
    plain = attention_error(samples, windows, torch.ones(1, 64))
    assert attention_error(samples, windows, key_scale) < 0.5 * plain
    flat, q2, k2 = _samples(torch.ones(64), torch.ones(64))
    ratio = torch.ones_like(q2)  # equal statistics in every channel: every strength gives d = 1
    assert choose_smoothing(flat, ratio, ratio)[0] == 0.0  # every d = 1: ties keep the weaker
    # a gain within the margin is not taken: mild outliers, a few percent of error at best
    gain = torch.ones(64)
    gain[[3, 35]] = 1.5
    power, key_scale, ratio = choose_smoothing(*_samples(gain, 1.0 / gain))
    assert (power, ratio) == (0.0, 1.0) and torch.equal(key_scale, torch.ones(1, 64))


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
    with pytest.raises(ValueError, match="must be a file path or"):
        cal.resolve({"nf4kv": {"calibration": 3}}, config)


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
    assert {layer.power for layer in first.layers.values()} <= set(cal.KEY_SMOOTHING_POWERS)
    for layer in first.layers.values():
        assert layer.key_scale.shape == (model_shape["kv_heads"], model_shape["head_dim"])
        assert torch.allclose(layer.key_scale.log().mean(-1), torch.zeros(model_shape["kv_heads"]), atol=1e-5)
        # RoPE pairs (neox: i, i + D/2) share their d
        half = model_shape["head_dim"] // 2
        assert torch.equal(layer.key_scale[:, :half], layer.key_scale[:, half:])
        # a layer left unsmoothed is exactly d = 1 (its smoother is skipped); a smoothed one is not
        assert (layer.power == 0) == bool((layer.key_scale == 1).all())
        assert (layer.power == 0) == (layer.error_ratio == 1.0)
    spread = torch.stack([layer.key_scale for layer in first.layers.values()])
    assert float(spread.max() / spread.min()) > 1.5  # a real per-channel statistic, not ones
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
    for layer in data["layers"].values():
        d = torch.rand(layer["num_kv_heads"], layer["head_dim"], generator=gen) * 3.5 + 0.25
        layer["key_scale"] = (d / d.log().mean(-1, keepdim=True).exp()).tolist()
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
    assert plain[1] != cold[1]  # the smoothing reaches the cache: other codes, other logprobs


@pytest.mark.slow
def test_another_models_calibration_is_refused_at_startup(calibrated, model_dir, tmp_path):
    data = calibrated[0].to_json()
    data["fingerprint"] = "0" * 16
    data["model"] = "some/other-model"
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps(data))
    with pytest.raises(Exception, match="was made for another model \\(some/other-model"):
        _engine(model_dir, str(wrong))
