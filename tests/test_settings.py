"""The nf4kv settings table: unknown keys and variables refused with a suggestion; docs match."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_nf4kv import settings
from vllm_nf4kv.settings import SETTINGS, check_environment, nf4kv_section, unknown_request_key

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_known_keys_pass():
    section = {"prefix_cache_ttl_s": 5, "max_request_ttl_s": None}
    assert nf4kv_section({"nf4kv": section, "other_plugin": {"x": 1}}) == section
    assert nf4kv_section({}) == {} and nf4kv_section(None) == {}


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("prefix_cache_ttl", "prefix_cache_ttl_s"), ("max_request_ttl", "max_request_ttl_s"), ("zzz", None)],
)
def test_unknown_key_is_refused_with_the_known_ones(key, suggestion):
    with pytest.raises(ValueError) as error:
        nf4kv_section({"nf4kv": {key: 5}})
    message = str(error.value)
    assert f"{key!r} is not a vllm-nf4kv setting" in message
    assert "known: prefix_cache_ttl_s, max_request_ttl_s" in message
    assert (f"did you mean {suggestion!r}?" in message) if suggestion else "did you mean" not in message


def test_section_must_be_an_object():
    with pytest.raises(ValueError, match="must be a JSON object"):
        nf4kv_section({"nf4kv": 5})


def test_unknown_environment_variable_is_refused():
    check_environment({"NF4KV_PREFIX_CACHE_TTL_S": "5", "NF4KV_CPU_KERNELS": "0", "PATH": "/bin"})
    with pytest.raises(ValueError, match="did you mean 'NF4KV_PREFIX_CACHE_TTL_S'"):
        check_environment({"NF4KV_PREFIX_CACHE_TTL": "5"})


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_cpu_kernels_switch_takes_0_or_1(value):
    with pytest.raises(ValueError, match="give 1 .* or 0"):
        check_environment({settings.CPU_KERNELS.env_var: value})


def test_docs_table_is_the_settings_table():
    """Key, variable, values and default of every row, as users read them in docs/configuration.md."""
    rows = []
    for line in DOCS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("`NF4KV_"):
            key = None if cells[0] == "(none)" else cells[0].strip("`")
            rows.append((key, cells[1].strip("`"), cells[2], cells[3]))
    assert rows == [(s.key, s.env_var, s.values, s.default) for s in SETTINGS]


def test_typo_stops_vllms_startup(model_dir, monkeypatch):
    import vllm_nf4kv.plugin as plugin

    plugin.register()
    from vllm.engine.arg_utils import EngineArgs

    typo = {"nf4kv": {"prefix_cache_ttl": 5}}
    args = EngineArgs(model=str(model_dir), enforce_eager=True, additional_config=typo)
    with pytest.raises(ValueError, match="did you mean 'prefix_cache_ttl_s'"):
        args.create_engine_config()
    monkeypatch.setenv("NF4KV_MAX_REQUEST_TTL", "60")
    with pytest.raises(ValueError, match="did you mean 'NF4KV_MAX_REQUEST_TTL_S'"):
        EngineArgs(model=str(model_dir), enforce_eager=True).create_engine_config()


def test_unknown_request_keys_are_named_with_the_closest_known_one():
    assert unknown_request_key({"nf4kv_prefix_ttl_s": 60, "other_plugin_key": 1}) is None
    key, error = unknown_request_key({"top_k": 3, "nf4kv_prefix_tl_s": 60})
    assert key == "nf4kv_prefix_tl_s"
    assert "did you mean 'nf4kv_prefix_ttl_s'?" in str(error)
    key, error = unknown_request_key({"NF4KV_PREFIX_TTL_S": 60})  # a key is matched exactly
    assert key == "NF4KV_PREFIX_TTL_S" and "known: nf4kv_prefix_ttl_s" in str(error)
