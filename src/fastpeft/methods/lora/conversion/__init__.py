"""LoRA adapter files rewritten on save or load: adapters that rewrote the base, saved for the original base
(original_base.py), and adapters saved on transformers v4 MoE models, read into the v5 layout (moe.py).
"""
