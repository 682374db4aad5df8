"""Integrations with other libraries (transformers defaults, Trainer, diffusers, bitsandbytes); lazy
imports."""
