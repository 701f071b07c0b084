"""The gRPC front end of safety-classifier: `safety serve`, a Python client, and `safety classify --remote`.

Owns: the `safety.v1` API (proto/safety/v1/safety.proto), dynamic batching of concurrent requests, admission,
status codes, health, metrics and TLS/API-key auth. Must not know: Celery or the worker (except the job
submission client `worker.jobs`); it reaches the model only through the engine API (`model`).
"""
