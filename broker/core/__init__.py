"""The pure core: values and decisions over them; imports only the standard library, pydantic and config's schema."""
