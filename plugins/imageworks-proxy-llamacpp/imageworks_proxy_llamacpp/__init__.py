"""imageworks-proxy-llamacpp: serve ``backend: "gguf"`` registry entries through llama.cpp's
``llama-server``."""

__version__ = "0.1.0"
