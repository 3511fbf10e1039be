"""Worker-side adapters: the only modules that import kubernetes, GitPython and httpx (for Git hosts)."""
