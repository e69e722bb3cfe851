"""What an operator sees: a benchmark submitted as a Ray job, and the Prometheus series the README lists."""

from __future__ import annotations

import pathlib
import re
import sys
import time
import urllib.request

import ray

from cluster.actor import find_controller

ROOT = pathlib.Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 180.0
SCRAPE_TIMEOUT_S = 60.0


def test_a_benchmark_submitted_as_a_ray_job_runs_and_logs_its_table(cluster, dashboard):
    """As the README's `ray job submit ... -- python scripts/bench_job.py`: the job server runs beside
    Serve, the job drives the app, and the table lands in the job's logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    _config, base = cluster
    client = JobSubmissionClient(dashboard)
    # the head node is this machine: the entrypoint runs in the checkout with this interpreter
    entrypoint = (f"cd {ROOT} && {sys.executable} scripts/bench_job.py --base-url {base} --rate 4 --duration 3 "
                  "--seed 0 --quiet")
    job = client.submit_job(entrypoint=entrypoint)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (state := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job} still {state} after {JOB_TIMEOUT_S:g} s"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert state == JobStatus.SUCCEEDED, logs[-3000:]
    header = re.search(r"^\| tenant \| reqs \| failed \| TTFT p50 .*$", logs, re.M)
    assert header, logs[-3000:]
    overall = re.search(r"^\| all \| (\d+) \| (\d+) \|", logs, re.M)
    assert overall and int(overall[1]) > 0 and int(overall[2]) == 0, logs[-3000:]


# The series the README lists, as a scraper sees them, with the labels each must carry
README_SERIES = {
    "ray_oneiros_ttft_seconds_count": {"replica", "model"},
    "ray_oneiros_tbt_seconds_count": {"replica", "model"},
    "ray_oneiros_kv_pages": {"replica", "model"},
    "ray_oneiros_resident_layers": {"replica", "model"},
    "ray_oneiros_pool_pages": {"replica", "owner"},
    "ray_oneiros_lent_pages": {"replica"},
    "ray_oneiros_remap_events_total": {"replica", "kind"},
    "ray_oneiros_failovers_total": {"model"},
}
APPEAR_WITH_FIRST_EVENT = {"ray_oneiros_remap_events_total", "ray_oneiros_failovers_total"}  # counters
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)", re.M)


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every oneiros sample on every node's metrics endpoint: (name, labels, value)."""
    samples = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        text = urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                                      timeout=10).read().decode()
        for m in SAMPLE.finditer(text):
            if m["name"].startswith("ray_oneiros_"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
                samples.append((m["name"], labels, float(m["value"])))
    return samples


def ttft_count(samples, model: str) -> float:
    return sum(v for n, labels, v in samples if n == "ray_oneiros_ttft_seconds_count" and labels.get("model") == model)


def test_prometheus_series_are_what_the_readme_lists_with_plausible_values(cluster):
    config, base = cluster
    readme = (ROOT / "README.md").read_text()
    for name in README_SERIES:  # the README names each series as scraped (histograms by their base name)
        assert name.removesuffix("_count") in readme, name
    import openai

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    before = ttft_count(scrape(), "opt")
    sent = 5
    for i in range(sent):
        client.completions.create(model="opt", prompt=[5 + i, 6, 7], max_tokens=4, temperature=0)
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while (samples := scrape()) is not None and ttft_count(samples, "opt") < before + sent:
        assert time.monotonic() < deadline, f"TTFT count of opt {ttft_count(samples, 'opt')}, want {before + sent}"
        time.sleep(1)
    assert ttft_count(samples, "opt") == before + sent  # one first token per request, counted once
    for name, labels in README_SERIES.items():
        found = [lab for n, lab, _ in samples if n == name]
        if name in APPEAR_WITH_FIRST_EVENT and not found:
            continue  # a counter appears with its first event (a remap, a replica's death)
        assert found, f"{name} not scraped"
        assert all(labels <= set(lab) for lab in found), (name, found[:3])
    replicas = {lab["replica"] for n, lab, _ in samples if n == "ray_oneiros_pool_pages"}
    assert len(replicas) >= config.replicas.num_replicas  # (a replica killed earlier may still be listed)
    params = []
    for rid in replicas:
        pages = {lab["owner"]: v for n, lab, v in samples if n == "ray_oneiros_pool_pages" and lab["replica"] == rid}
        assert set(pages) == {"free", "param", "kv", "staging"}
        assert sum(pages.values()) == config.memory.num_pages, pages  # the owners add up to the pool
        params.append(pages["param"])
    assert max(params) > 0  # some replica holds parameters (a fresh replacement may not yet)
    models = {m.name for m in config.models}
    assert {lab["model"] for n, lab, _ in samples if n == "ray_oneiros_kv_pages"} <= models
    assert find_controller(config.app_name) is not None
