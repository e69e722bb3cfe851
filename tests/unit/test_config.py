"""The configuration files: the shipped YAML equals the built-in default, Serve accepts its config,
and bad files fail at load with the field named."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from replicas.config import OneirosConfig, default_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_shipped_yaml_is_the_built_in_default():
    assert OneirosConfig.load(ROOT / "replicas/oneiros.yaml") == default_config()


def test_serve_accepts_the_shipped_serve_config():
    schema = pytest.importorskip("ray.serve.schema")
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "replicas/serve_config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "replicas.service.deployments:app_builder"
    assert OneirosConfig.load(ROOT / app.args["config"]).app_name == app.name
    assert config.http_options.host == "0.0.0.0" and config.grpc_options.port == 9000  # reachable from outside a pod


def test_the_gpu_config_is_the_gpu_rayservice_s_and_scales_on_memory_pressure():
    gpu = OneirosConfig.load(ROOT / "replicas/oneiros-gpu.yaml")
    assert gpu.memory.device == "cuda" and gpu.replicas.num_gpus == 1
    assert gpu.replicas.autoscaling is not None and gpu.replicas.autoscaling.max_replicas == 8
    service = yaml.safe_load((ROOT / "k8s/rayservice-gpu.yaml").read_text())
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    inline = OneirosConfig.model_validate(app["args"]["oneiros"])
    assert inline.model_dump(exclude={"http"}) == gpu.model_dump(exclude={"http"})


@pytest.mark.parametrize("patch, message", [
    ({"models": []}, "non-empty"),
    ({"models": [{"name": "a", "architecture": "tiny-llama"}, {"name": "a", "architecture": "tiny-opt"}]}, "duplicates"),
    ({"models": [{"name": "a"}]}, "exactly one of path, architecture, hf_config"),
    ({"models": [{"name": "a", "architecture": "gpt-9"}]}, "unknown architecture"),
    ({"memory": {"num_pages": 0}}, "num_pages"),
    ({"remap": {"max_remapped_fraction": 1.0}}, "max_remapped_fraction"),
    ({"replicas": {"num_replicas": 2, "typo_field": 1}}, "typo_field"),
])
def test_bad_config_fails_with_the_field_named(tmp_path, patch, message):
    data = yaml.safe_load((ROOT / "replicas/oneiros.yaml").read_text()) | patch
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message):
        OneirosConfig.load(path)


def test_oneiros_serve_with_a_bad_config_exits_non_zero_with_a_message(tmp_path, capsys):
    from replicas.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("models: []\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "bad config" in capsys.readouterr().err
