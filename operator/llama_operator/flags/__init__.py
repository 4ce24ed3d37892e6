"""llama-server flags: typed settings rendered to flags, the flag catalog, and validation."""
