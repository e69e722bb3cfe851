"""`oneiros serve` as a `vllm serve` user types it: folders as arguments, --model NAME=PATH, --host,
--port, --api-key, each overriding the YAML config; bad flags are one line on stderr, no trace."""

from __future__ import annotations

import json

from replicas.cli import make_parser, serve_config


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


def test_no_flags_keep_the_built_in_default():
    config = serve_config(make_parser().parse_args(["serve"]))
    assert [m.name for m in config.models] == ["llama", "qwen", "opt"] and config.http.port == 8000


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    for argv, fragment in [(["serve", str(tmp_path)], "not a Hugging Face model folder"),
                           (["serve", "--model", "nopath"], "expected NAME=PATH"),
                           (["serve", "--api-key", "short"], "bad flags")]:
        assert serve_config(make_parser().parse_args(argv)) is None
        assert fragment in capsys.readouterr().err
