"""Batch jobs: the EBRAINS Neuromorphic Platform job path (nmpi API v3) run on this deployment.

A hub-managed service (`service.py`) serves the API at the root of its own address (the nmpi client keeps only
scheme://host:port of its `job_service`), keeps jobs in a SQLAlchemy store (`store.py`), and runs them with a runner
(`runner.py`) through an executor (`executor.py`: the user's own system account, in a scratch folder, with limits).
"""
