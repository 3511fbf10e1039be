"""cibroker: Git webhooks in, Tekton PipelineRuns out.

`broker` holds the web side (the webhook edge) and the vocabulary shared with the
Celery workers in `workers`. Settings and the routing-file schema live in `config`.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("cibroker")
except _metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
