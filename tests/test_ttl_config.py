"""Prefix-cache TTL configuration: sources, precedence and refused values.

Pure-Python checks of :mod:`vllm_nf4kv.ttl.config`, then the same rules through
vLLM's real ``EngineArgs.create_engine_config`` (the startup error a bad TTL
must give, before any model is loaded).
"""

from __future__ import annotations

import math

import pytest

from vllm_nf4kv.ttl.config import (
    ENV_VAR,
    MAX_REQUEST_ENV_VAR,
    parse_request_ttl,
    parse_ttl,
    resolve_ttl,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (600, 600.0),
        (0, 0.0),
        (2.5, 2.5),
        ("30", 30.0),
        (" 1.5 ", 1.5),
        ("1e3", 1000.0),
        (None, None),
        ("", None),
        (math.inf, None),
        ("inf", None),
    ],
)
def test_parse_valid(value, expected):
    assert parse_ttl(value, "test") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, ">= 0 seconds"),
        ("-0.5", ">= 0 seconds"),
        (-math.inf, ">= 0 seconds"),
        (math.nan, "NaN"),
        ("nan", "NaN"),
        ("abc", "must be a number"),
        ("10s", "must be a number"),
        (True, "must be a number"),
        ([600], "must be a number"),
        ({"s": 1}, "must be a number"),
    ],
)
def test_parse_refuses(value, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_ttl(value, "SOURCE")
    assert str(info.value).startswith("SOURCE: ")
    assert "e.g." in str(info.value)  # says what to give instead


def test_off_by_default():
    setting = resolve_ttl({}, environ={})
    assert setting.ttl_s is None and not setting.enabled


def test_cli_section():
    setting = resolve_ttl({"nf4kv": {"prefix_cache_ttl_s": 600}}, environ={})
    assert setting.ttl_s == 600.0 and "additional-config" in setting.source


def test_env_fallback():
    setting = resolve_ttl({"other": 1}, environ={ENV_VAR: "45"})
    assert setting.ttl_s == 45.0 and setting.source == ENV_VAR


def test_cli_wins_over_env():
    assert resolve_ttl({"nf4kv": {"prefix_cache_ttl_s": 2}}, environ={ENV_VAR: "1000"}).ttl_s == 2.0
    # even over a bad environment value: the CLI is what the operator set last
    assert resolve_ttl({"nf4kv": {"prefix_cache_ttl_s": 2}}, environ={ENV_VAR: "abc"}).ttl_s == 2.0


def test_null_and_empty_fall_through():
    assert resolve_ttl({"nf4kv": {"prefix_cache_ttl_s": None}}, environ={ENV_VAR: "7"}).ttl_s == 7.0
    assert resolve_ttl({"nf4kv": {}}, environ={ENV_VAR: "  "}).ttl_s is None


def test_env_error_names_the_variable():
    with pytest.raises(ValueError, match=f"^{ENV_VAR}: .*{ENV_VAR}=600"):
        resolve_ttl({}, environ={ENV_VAR: "soon"})


def test_section_must_be_an_object():
    with pytest.raises(ValueError, match="must be a JSON object"):
        resolve_ttl({"nf4kv": 600}, environ={})


def test_non_mapping_additional_config_has_no_ttl():
    assert resolve_ttl(object(), environ={}).ttl_s is None


# -- a request's own TTL and the server's maximum -------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (60, 60.0),
        (0, 0.0),
        (2.5, 2.5),
        ("60", 60.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        (" 5m ", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        (None, None),
    ],
)
def test_parse_request_ttl_valid(value, expected):
    assert parse_request_ttl(value) == expected


@pytest.mark.parametrize(
    "value", [-1, "-5", math.nan, math.inf, "inf", "nan", True, "ten", "5 days", "", [60], {}]
)
def test_parse_request_ttl_refuses(value):
    with pytest.raises(ValueError, match=r"vllm_xargs\.nf4kv_prefix_ttl_s must be seconds as a number >= 0"):
        parse_request_ttl(value)


def test_request_ttl_above_the_maximum():
    assert parse_request_ttl("1h", max_ttl_s=3600) == 3600.0
    message = r"above this server's maximum of 3600 s \(nf4kv\.max_request_ttl_s\)"
    with pytest.raises(ValueError, match=message):
        parse_request_ttl(3601, max_ttl_s=3600)


def test_max_request_ttl_sources():
    assert resolve_ttl({}, {}).max_request_ttl_s is None
    assert resolve_ttl({"nf4kv": {"max_request_ttl_s": 600}}, {}).max_request_ttl_s == 600
    assert resolve_ttl({}, {MAX_REQUEST_ENV_VAR: "60"}).max_request_ttl_s == 60
    cli_wins = resolve_ttl({"nf4kv": {"max_request_ttl_s": 5}}, {MAX_REQUEST_ENV_VAR: "60"})
    assert cli_wins.max_request_ttl_s == 5
    with pytest.raises(ValueError, match=r"nf4kv\.max_request_ttl_s: prefix-cache TTL must be >= 0"):
        resolve_ttl({"nf4kv": {"max_request_ttl_s": -1}}, {})


# -- through vLLM's own startup path ------------------------------------------------


@pytest.fixture(scope="module")
def engine_args_cls():
    import vllm_nf4kv.plugin as plugin

    plugin.register()
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs


@pytest.mark.parametrize(
    ("additional_config", "env", "message"),
    [
        ({"nf4kv": {"prefix_cache_ttl_s": -1}}, None, ">= 0 seconds"),
        ({"nf4kv": {"prefix_cache_ttl_s": math.nan}}, None, "NaN"),
        ({"nf4kv": {"prefix_cache_ttl_s": "ten"}}, None, "must be a number"),
        ({}, "abc", f"^{ENV_VAR}: "),
        ({}, "-3", f"^{ENV_VAR}: .*>= 0 seconds"),
        ({"nf4kv": {"max_request_ttl_s": "often"}}, None, "max_request_ttl_s: .* must be a number"),
    ],
)
def test_bad_ttl_is_a_startup_error(engine_args_cls, model_dir, monkeypatch, additional_config, env, message):
    if env is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env)
    args = engine_args_cls(model=str(model_dir), enforce_eager=True, additional_config=additional_config)
    with pytest.raises(ValueError, match=message):
        args.create_engine_config()


def test_good_ttl_passes_startup_checks(engine_args_cls, model_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "abc")  # ignored: the CLI value wins
    args = engine_args_cls(
        model=str(model_dir), enforce_eager=True, additional_config={"nf4kv": {"prefix_cache_ttl_s": 600}}
    )
    config = args.create_engine_config()
    assert config.additional_config["nf4kv"]["prefix_cache_ttl_s"] == 600
