"""Model files (mesh402.models): GGUF metadata, the catalog and the node's home, safetensors folders."""
