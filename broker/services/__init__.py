"""Services: what cibroker does, written against broker.ports; never imports an adapter."""
