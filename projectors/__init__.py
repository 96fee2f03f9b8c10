"""Projectors: map vision tokens of width d_vit to an LLM width d_llm (filled by the projector issue)."""
