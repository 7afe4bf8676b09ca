"""Small self-contained reference models used by tests and the default benchmark."""

from .llama import LlamaConfig, LlamaForCausalLM, init_weights, small, tiny

__all__ = ["LlamaConfig", "LlamaForCausalLM", "init_weights", "small", "tiny"]
