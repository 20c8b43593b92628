"""LightLLM's flag names onto EngineConfig."""

import pytest

from lightllm_plugin.cli import build_serve_parser, config_from_args
from lightllm_plugin.config import EngineConfig


def _config(argv):
    parser = build_serve_parser()
    return config_from_args(parser.parse_args(argv), parser)


def test_lightllm_command_line_maps_onto_the_config(capsys):
    cfg = _config(
        "--model_dir /m --host 0.0.0.0 --port 9000 --tp 1 --max_total_token_num 8192 --mem_fraction 0.5 "
        "--max_req_total_len 4096 --max_req_input_len 1024 --batch_max_tokens 2048 --running_max_req_size 8 "
        "--tokenizer_mode auto --trust_remote_code --eos_id 2 7 --data_type float16 --long_truncation_mode head".split()
    )
    assert (cfg.model_dir, cfg.host, cfg.port, cfg.max_total_token_num) == ("/m", "0.0.0.0", 9000, 8192)
    assert (cfg.mem_fraction, cfg.max_req_total_len, cfg.max_req_input_len) == (0.5, 4096, 1024)
    assert (cfg.batch_max_tokens, cfg.running_max_req_size, cfg.trust_remote_code) == (2048, 8, True)
    assert (cfg.eos_id, cfg.data_type, cfg.long_truncation_mode) == ([2, 7], "float16", "head")
    assert capsys.readouterr().err == ""


def test_defaults():
    cfg = _config([])
    assert cfg.host == "127.0.0.1" and cfg.model_dir is None and cfg.long_truncation_mode is None


def test_flags_without_effect_warn_once_each(capsys):
    _config(["--mode", "triton_flashdecoding", "--disable_cudagraph"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("no effect" in line for line in err)
    assert any("--disable_cudagraph" in line for line in err) and any("--mode" in line for line in err)


def test_tp_and_nccl_port(capsys):
    cfg = _config(["--tp", "2", "--nccl_port", "29123"])
    assert (cfg.tp, cfg.nccl_port) == (2, 29123)
    # LazyLLM writes --nccl_port=None when it has no port: the default stays, silently
    assert _config(["--nccl_port=None"]).nccl_port == EngineConfig().nccl_port
    assert capsys.readouterr().err == ""
    for bad in (["--nccl_port", "abc"], ["--tp", "0"], ["--nccl_port", "70000"]):
        with pytest.raises(SystemExit):
            _config(bad)
    err = capsys.readouterr().err
    assert "nccl_port must be a port number" in err and "tp must be >= 1" in err


def test_unknown_flags_and_bad_values_are_errors(capsys):
    with pytest.raises(SystemExit):
        _config(["--no_such_flag", "1"])
    with pytest.raises(SystemExit):
        _config(["--long_truncation_mode", "middle"])
    assert "long_truncation_mode" in capsys.readouterr().err


def test_lazyllm_command_line_parses(capsys):
    # what LazyLLM's lightllm deploy writes: --key=value, strings quoted by its shell
    argv = (
        "--model_dir=/m --tp=1 --max_total_token_num=64000 --eos_id=2 --port=23456 --host=0.0.0.0 "
        "--nccl_port=None --tokenizer_mode=auto --running_max_req_size=256 --data_type=float16 "
        "--max_req_total_len=64000 --max_req_input_len=4096 --long_truncation_mode=head --trust_remote_code"
    ).split()
    cfg = _config(argv)
    assert (cfg.eos_id, cfg.data_type, cfg.max_req_total_len, cfg.long_truncation_mode) == ([2], "float16", 64000, "head")
    assert (cfg.tp, cfg.nccl_port) == (1, EngineConfig().nccl_port)


def test_vllm_spellings_and_the_api_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("LIGHTLLM_API_KEY", raising=False)
    cfg = _config(["--served-model-name", "m1", "--api-key", "k1"])
    assert (cfg.served_model_name, cfg.api_key) == ("m1", "k1")
    assert "k1" not in repr(cfg)
    assert _config([]).api_key is None
    monkeypatch.setenv("LIGHTLLM_API_KEY", "k2")
    assert _config([]).api_key == "k2"
    assert _config(["--api_key", "k3"]).api_key == "k3"


def test_the_served_model_name_defaults_to_the_model_folder_or_file():
    from lightllm_plugin.config import EngineConfig

    assert EngineConfig(model_dir="/models/Qwen2.5-0.5B-Instruct/").model_name() == "Qwen2.5-0.5B-Instruct"
    assert EngineConfig(model_dir="/m/SmolLM2-135M-Instruct.Q4_1.gguf").model_name() == "SmolLM2-135M-Instruct.Q4_1"
    assert EngineConfig(model_dir="/m/x", served_model_name="mine").model_name() == "mine"


def test_kv_cache_dtype_flag_and_lightllm_int8kv_mode(capsys):
    assert _config([]).kv_cache_dtype == "auto"
    assert _config(["--kv_cache_dtype", "int8"]).kv_cache_dtype == "int8"
    assert _config(["--mode", "triton_int8kv"]).kv_cache_dtype == "int8"
    assert capsys.readouterr().err == ""
    # a mode this engine has no counterpart for still warns; the int8 one next to it still applies
    cfg = _config(["--mode", "triton_flashdecoding", "triton_int8kv"])
    assert cfg.kv_cache_dtype == "int8"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "triton_flashdecoding" in err[0] and "triton_int8kv" not in err[0]


def test_bad_kv_cache_dtype_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        _config(["--kv_cache_dtype", "fp8"])
    assert "kv_cache_dtype must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a mode contradicting an explicit flag
        _config(["--kv_cache_dtype", "fp8", "--mode", "triton_int8kv"])
    assert "--mode triton_int8kv sets kv_cache_dtype=int8" in capsys.readouterr().err
