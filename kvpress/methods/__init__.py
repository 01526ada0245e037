"""kvpress methods: one module per method, each with its config dataclass and runtime."""
