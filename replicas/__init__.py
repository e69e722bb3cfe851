"""replicas: the multi-tenant engine and everything that serves it.

    engine/    the core: models, scheduler, executor, sampling, tokenizer, remap driving. Imports only remap.
    service/   the Ray Serve shell: deployments, EngineServer, OpenAI ingress and protocol, router, gRPC.
    sim/       the virtual-clock shell: the same engine with no tensors, the paper's experiments. Pure.
    bench/     the load client (`oneiros bench`).
    config.py  the one YAML (OneirosConfig); cli.py the `oneiros` command; pull.py `oneiros pull`;
    walkthrough.py `oneiros demo`.

tests/unit/test_front_door.py checks the import directions.
"""
