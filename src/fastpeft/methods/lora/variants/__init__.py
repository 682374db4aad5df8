"""LoRA variants: per-adapter strategies that change how a LoRA layer is initialised, applied and merged.

base.py holds the interface, table.py which option turns which variant on (and on which layer kinds).
One module per variant: DoRA (dora.py, dora_bnb.py), aLoRA, Arrow, BD-LoRA, KaSA, VeLoRA, MonteCLoRA;
MiCA's variant sits with its init in ../inits/mica.py. Each module with a LoraConfig option registers that
option's check in ../subconfig.py when imported.
"""
