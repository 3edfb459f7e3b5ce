"""The app for the operator's tools, configured from the environment (ZIMAGE_BROKER, ZIMAGE_BROKER_PASSWORD_FILE,
ZIMAGE_TLS_CA), so no password is typed on their command lines:

    celery -A zimage_queue.ops inspect zimage_health      # each worker: ComfyUI reachable, model, GPU memory
    celery -A zimage_queue.ops inspect active             # the job each worker runs
    celery -A zimage_queue.ops flower --address=127.0.0.1 # the dashboard: queue depth, workers, failures
"""
from __future__ import annotations

from . import tasks  # noqa: F401  (registers zimage_health, so `celery inspect` knows its name)
from .app import make_app
from .broker import load_broker

# takes no jobs: never sweeps for lost ones (the workers do), so the ops user writes nothing but control replies
app = make_app(load_broker(None), takes_jobs=False)
