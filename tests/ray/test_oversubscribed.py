"""More models than memory, through Serve: four model folders (two architectures) on two replicas
whose pools hold them only by lending idle tenants' layers. Every request completes exactly as the
engine alone would answer it, none gets a 503; a model too big for any pool gets a 503 at once.

A second app in the session cluster, like the autoscaling test's."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import ray
from ray import serve
from safetensors.torch import save_file

from cluster.actor import find_controller
from remap import DeviceMemory
from replicas.cli import free_port
from replicas.config import TINY_MODELS, default_config
from replicas.service.deployments import build_app
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.models import ModelConfig, dummy_weights
from replicas.engine.sampling import SamplingParams
from replicas.service.server import load_model

openai = pytest.importorskip("openai")

APP = "oneiros-os"
PAGE = 64 << 10
FOLDERS = [("m-llama-a", "tiny-llama", 11), ("m-opt-a", "tiny-opt", 12), ("m-llama-b", "tiny-llama", 13),
           ("m-opt-b", "tiny-opt", 14)]


def write_folder(path, architecture: str, seed: int, **overrides) -> None:
    """A Hugging Face folder of random weights (config.json + safetensors; byte-level tokenizer)."""
    path.mkdir()
    hf = dict(TINY_MODELS[architecture], **overrides)
    (path / "config.json").write_text(json.dumps(hf))
    state = dummy_weights(ModelConfig.from_hf(hf), seed)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))


def param_pages(spec) -> int:
    config, state, _ = load_model(spec)
    engine = LLMEngine(DeviceMemory(4096, PAGE), EngineConfig(link_bytes_per_s=1e10))
    engine.add_model("m", config, state)
    return engine.memory.pool.num_pages - engine.memory.pool.num_free


def alone(spec, prompt: list[int], max_tokens: int) -> str:
    config, state, tokenizer = load_model(spec)
    engine = LLMEngine(DeviceMemory(4096, PAGE), EngineConfig(link_bytes_per_s=1e10))
    engine.add_model(spec.name, config, state, tokenizer=tokenizer)
    return tokenizer.decode(engine.generate(spec.name, [prompt], SamplingParams(max_tokens=max_tokens,
                                                                                   ignore_eos=True))[0])


@pytest.fixture(scope="module")
def app(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    models = []
    for name, arch, seed in FOLDERS:
        write_folder(root / name, arch, seed)
        models.append({"name": name, "path": str(root / name)})
    write_folder(root / "huge", "tiny-llama", 5, num_hidden_layers=12, intermediate_size=2048)
    models.append({"name": "huge", "path": str(root / "huge"), "min_replicas": 0})
    config = default_config(app_name=APP, models=models, memory={"page_size_bytes": PAGE, "num_pages": 1},
                            http={"port": free_port()},  # its own ingress serves HTTP there
                            replicas={"num_replicas": 2, "num_cpus": 0.5, "report_period_s": 0.2})
    sizes = sorted(param_pages(config.model(name)) for name, _, _ in FOLDERS)
    # Two models per replica only fit by lending: the pool is 3/4 of the two largest, plus KV room.
    pages = int(0.75 * (sizes[-1] + sizes[-2])) + 8
    assert pages < sizes[-1] + sizes[-2] and param_pages(config.model("huge")) > 2 * pages
    config = config.model_copy(update={"memory": config.memory.model_copy(update={"num_pages": pages})})
    serve.run(build_app(config), name=APP, route_prefix="/os", blocking=False)
    yield config
    serve.delete(APP)
    controller = find_controller(APP)
    if controller is not None:
        ray.kill(controller)


def test_four_models_that_fit_only_by_lending_all_answer_exactly_with_no_503(app):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http.port}/v1", api_key="unused", max_retries=0, timeout=120)
    jobs = [(name, [5 + i, 17, 33 + i, 9, 70]) for i in range(6) for name, _, _ in FOLDERS]  # 24 requests

    def ask(job):
        name, prompt = job
        out = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(24) as pool:  # all at once, on a cluster that just started
        got = list(pool.map(ask, jobs))
    for (name, prompt), text in zip(jobs, got):
        assert text == alone(app.model(name), prompt, 12), name


def test_a_model_too_big_even_with_lending_gets_an_immediate_clear_503(app):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http.port}/v1", api_key="unused", max_retries=0, timeout=120)
    start = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="huge", prompt=[5, 6, 7], max_tokens=4)
    assert info.value.status_code == 503
    assert "never fits here" in str(info.value) and time.monotonic() - start < 10
