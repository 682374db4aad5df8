"""LoRA initialisations (`init_lora_weights`): the scheme table (schemes.py: default, gaussian,
orthogonal, PiSSA, OLoRA, ...; common.py: their shared helpers) and the data-driven or quantising schemes
with their configs and preprocessing (CorDA, EVA, LoRA-GA, LoftQ, MiCA). Modules with a LoraConfig option
register that option's check in ../subconfig.py when imported.
"""
