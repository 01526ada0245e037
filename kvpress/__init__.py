"""kvpress: KV-cache compression and sparse attention for Hugging Face transformers."""
