"""The Celery worker pool of the registry: the same job code as ``qfilters serve``'s runner, spread over GPUs and hosts.

``qfilters worker --queue gpu --gpus 0,1`` starts correctly configured workers; see :mod:`workers.app` for the Celery
settings and :mod:`workers.tasks` for the tasks (thin: IDs in, rows re-read, library code called).
"""
