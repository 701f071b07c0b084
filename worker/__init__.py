"""safety-classifier's batch side: Celery workers on Redis that classify large jobs in chunks.

Modules: `settings` (the `SAFETY_*` environment), `app` (the Celery app), `tasks` (the chunk task, run in
worker processes), `store` (the Redis layout of a job and its atomic scripts), `items` (pure item
validation), `jobs` (the client: submit, status, results, cancel), `cli` (`safety worker|submit|job`),
`faults` (a test-only fault hook).
Importing this package imports nothing: `worker.jobs` must stay free of torch and of the model.
"""
