"""Settings (environment) and the routing file (YAML): schema, loading, validation."""
