"""svdfarm's worker: Celery tasks, SVD pipeline loading, rendering and video encoding."""
