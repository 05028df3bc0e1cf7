"""Two-stage LLaSM training on device meshes."""
