"""The multi-tenant engine: several models on one device's page pool (remap/), one step at a time.

    engine.py        LLMEngine: requests, the step (schedule -> execute -> postprocess), stats
    remap_driver.py  RemapDriver: snapshots for the RemapController, the step's plan, room, staging rings
    scheduler.py     per-tenant queues, chunked prefill, preemption (recompute / swap), the head first
    executor.py      TorchExecutor: the batch's forward pass over paged KV and streamed layers
    capacity.py      what a pool can give (admission, loads, reports, the autoscaler)
    metrics.py       TenantMetrics: step cost, arrivals, TTFT / TBT
    sampling.py, sequence.py, tokenizer.py, models/

Pure Python + torch: imports remap and nothing above it (no Ray, no HTTP, no replicas.service).
"""
