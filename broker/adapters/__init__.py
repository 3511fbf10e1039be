"""Broker-side adapters: the one module per outside client (Redis, Celery's wire format, an embedded redis-server)."""
