"""The simulator: the real engine, scheduler and RemapController on a virtual clock, with no tensors.

    engine, sim = make_sim_engine(GH200, EngineConfig(...))
    engine.add_model("a", llama3_8b(), meta_weights(llama3_8b()))
    engine.add_request("a", prompt_ids, SamplingParams(max_tokens=128)); engine.step()  # clock moves

devices.py: DeviceProfile presets and a measured CPU profile. cost.py: the roofline step-cost model,
calibrated on Vidur's H100 profiles, and the paper's model configs. executor.py: SimExecutor and the
byte-free memory backend. clock.py: VirtualClock. run.py: `simulate` (replay a workload under one
policy, the Policy enum and its engine settings). report.py: summaries, the comparison against the
baselines, the table. cli.py: the `oneiros sim` command. fleet.py: replicas under an autoscaling
policy, routed with the production router's ranking. presets.py: the paper's experiments (c1, c2,
sweeps) and devices. Nothing here imports Ray.
"""

from replicas.sim.clock import VirtualClock
from replicas.sim.cost import (
    H100_FIT, PAPER_MODELS, BatchShape, CostModel, CostParams, StepCost, VidurFit, fit_vidur, layer_param_bytes,
    llama2_13b, llama3_8b, opt_6_7b, opt_13b, opt_30b,
)
from replicas.sim.devices import GH200, H100_PCIE, H100_SXM, H200, PRESETS, DeviceProfile, cpu_profile
from replicas.sim.executor import (
    NullBackend, SimDeviceMemory, SimExecutor, SimStats, make_sim_engine, meta_weights,
)
from replicas.sim.presets import DEVICES, Preset, get_device, get_preset
from replicas.sim.presets import PRESETS as EXPERIMENTS
from replicas.sim.report import compare
from replicas.sim.run import POLICIES, RequestRecord, SimResult, SimSettings, simulate, simulate_all

__all__ = [
    "VirtualClock", "H100_FIT", "PAPER_MODELS", "BatchShape", "CostModel", "CostParams", "StepCost", "VidurFit",
    "fit_vidur", "layer_param_bytes", "llama2_13b", "llama3_8b", "opt_6_7b", "opt_13b", "opt_30b",
    "GH200", "H100_PCIE", "H100_SXM", "H200", "PRESETS", "DeviceProfile", "cpu_profile",
    "NullBackend", "SimDeviceMemory", "SimExecutor", "SimStats", "make_sim_engine", "meta_weights",
    "DEVICES", "EXPERIMENTS", "Preset", "get_device", "get_preset",
    "POLICIES", "RequestRecord", "SimResult", "SimSettings", "compare", "simulate", "simulate_all",
]
