"""cibroker: Git webhooks in, Tekton PipelineRuns out.

`broker` holds the web side (the webhook edge) and the vocabulary shared with the
Celery workers in `workers`. Settings and the routing-file schema live in `config`.
"""
