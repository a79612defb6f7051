"""Exporters from plans to runtime formats: compressed-tensors/vLLM, GPTQModel dynamic, llama.cpp (issue: export)."""
