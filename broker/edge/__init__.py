"""The HTTP surfaces: webhooks, health, API, dashboard and metrics (Starlette); never imports workers."""
