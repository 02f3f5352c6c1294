"""Importers and exporters between pocketlm model directories and other formats (GGUF, HF, llama2.c)."""
