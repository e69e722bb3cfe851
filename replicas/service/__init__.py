"""The Ray Serve shell around the engine: what runs a replica and talks to clients.

    deployments.py  the Serve app: EngineReplica and OpenAIIngress deployments, build_app
    server.py       EngineServer: one engine on its own thread, async streams, loads, reports
    ingress.py      the OpenAI HTTP frontend (FastAPI) and its placement retries
    openai_api/     the OpenAI protocol: request models, errors, sampling mapping, prompts, responses, SSE
    openapi.py      the OpenAPI document of the HTTP API
    router.py       the memory-aware request router (Serve's RequestRouter API)
    grpc/           the gRPC API (service, generated stubs)
    telemetry.py    device telemetry (NVML) and metrics export

It may import replicas.engine, replicas.config, cluster and autoscaler, and Ray; nothing under
replicas.engine imports it (tests/unit/test_front_door.py checks the direction).
"""
