"""Many ComfyUIs, one queue: batch jobs spread over Celery workers through Redis.

- broker.py: where the broker is, its password (from the environment or a file, never the command line), TLS,
  and a first connection that turns Redis's refusals into errors that name the fix.
- app.py: the Celery app both sides share (queue, late acks, prefetch 1, redelivery).
- acl.py: the Redis ACL users (client, worker, ops) as an ACL file.
- comfy_job.py: one job on the local ComfyUI (prompt id from the job id, wait, images, names).
- tasks.py: the Celery task a worker runs, and its health answer for `celery inspect`.
- worker.py: the `zimage-worker` command.
- submit.py: the batch client's queue mode (`zimage-batch --broker`).
- ops.py: the app for `celery -A zimage_queue.ops inspect …` and Flower, configured from the environment.
"""
