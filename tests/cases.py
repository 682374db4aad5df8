"""METHOD_CASES: one row per (method, model, config) for the contract-property matrix.

A row: `Case(id, model, config_cls name, config kwargs, mergeable)`. Adding a method adds rows here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # key of tests/models.py MODELS
    method: str  # config class name exported by fastpeft and peft
    kwargs: dict = field(default_factory=dict)
    mergeable: bool = True  # merge_adapter supported for every targeted layer
    identity_init: bool = True


METHOD_CASES = [
    Case("lora-mlp", "mlp", "LoraConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("lora-mlp-save-head", "mlp", "LoraConfig", {"r": 4, "target_modules": ["lin0"], "modules_to_save": ["head"]}),
    Case("lora-mlp-rslora-bias-dropout", "mlp", "LoraConfig",
         {"r": 4, "lora_alpha": 16, "target_modules": ["lin0", "lin1"], "use_rslora": True, "lora_bias": True,
          "lora_dropout": 0.1}),
    Case("lora-mlp-gaussian-patterns", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": "gaussian", "rank_pattern": {"lin1": 2},
          "alpha_pattern": {"lin0": 32}}),
    Case("lora-mlp-bias-all", "mlp", "LoraConfig", {"r": 4, "target_modules": ["lin1"], "bias": "all"}),
    Case("lora-embedding", "emb", "LoraConfig", {"r": 4, "target_modules": ["emb", "lin"]}),
    Case("lora-gpt2-conv1d", "conv1d_gpt2", "LoraConfig", {"r": 4, "target_modules": ["c_fc", "c_proj"]}),
    Case("lora-conv1d", "conv1d", "LoraConfig", {"r": 4, "target_modules": ["conv0", "conv1"]}),
    Case("lora-conv2d", "conv2d", "LoraConfig", {"r": 4, "target_modules": ["conv0", "conv1"]}),
    Case("lora-conv2d-groups", "conv2d", "LoraConfig", {"r": 4, "target_modules": ["gconv"]}, mergeable=False),
    Case("lora-conv3d", "conv3d", "LoraConfig", {"r": 4, "target_modules": ["conv0", "conv1"]}),
    Case("lora-mha", "mha", "LoraConfig", {"r": 4, "target_modules": ["mha"]}),
    Case("lora-llama", "llama", "LoraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"],
                                                "task_type": "CAUSAL_LM"}),
    Case("lora-llama-all-linear-layer0", "llama", "LoraConfig",
         {"r": 4, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}),
    Case("lora-gpt2-default-targets", "gpt2", "LoraConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    Case("lora-t5", "t5", "LoraConfig", {"r": 4, "task_type": "SEQ_2_SEQ_LM"}),
    Case("lora-bert-cls", "bert_cls", "LoraConfig", {"r": 4, "task_type": "SEQ_CLS"}),
    Case("lora-mlp-orthogonal-init", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": "orthogonal"}),
    Case("dora-mlp", "mlp", "LoraConfig", {"r": 4, "target_modules": ["lin0", "lin1"], "use_dora": True}),
    Case("dora-mlp-rslora", "mlp", "LoraConfig",
         {"r": 4, "lora_alpha": 16, "target_modules": ["lin0", "lin1"], "use_dora": True, "use_rslora": True}),
    Case("dora-embedding", "emb", "LoraConfig", {"r": 4, "target_modules": ["emb", "lin"], "use_dora": True}),
    Case("dora-conv2d", "conv2d", "LoraConfig", {"r": 4, "target_modules": ["conv0", "conv1"], "use_dora": True}),
    Case("dora-gpt2-conv1d", "conv1d_gpt2", "LoraConfig",
         {"r": 4, "target_modules": ["c_fc", "c_proj"], "use_dora": True}),
    Case("dora-llama", "llama", "LoraConfig",
         {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True, "task_type": "CAUSAL_LM"}),
    # MiCA / VeLoRA (KaSA truncates the base weight, so identity at init and an untouched base do not hold)
    Case("mica-mlp", "mlp", "LoraConfig", {"r": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": "mica"}),
    Case("mica-embedding", "emb", "LoraConfig", {"r": 4, "target_modules": ["emb", "lin"], "init_lora_weights": "mica"}),
    Case("velora-mlp", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"], "velora_config": {"num_groups": 4}}),
    Case("velora-llama", "llama", "LoraConfig",
         {"r": 4, "target_modules": ["q_proj", "v_proj"], "velora_config": {"num_groups": 8}, "task_type": "CAUSAL_LM"}),
    # BD-LoRA; MonteCLoRA (stochastic only in training mode: the contract checks run in eval mode, plain LoRA there)
    Case("bdlora-mlp", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"],
          "use_bdlora": {"target_modules_bd_a": ["lin1"], "target_modules_bd_b": ["lin0"], "nblocks": 2}}),
    Case("bdlora-llama", "llama", "LoraConfig",
         {"r": 4, "target_modules": ["q_proj", "o_proj"], "task_type": "CAUSAL_LM",
          "use_bdlora": {"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj"], "nblocks": 2}}),
    Case("monteclora-mlp", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"], "monteclora_config": {"num_samples": 2, "buffer_size": 2}}),
    # aLoRA: token 5 occurs in both rows of llama_inputs, so the adapter acts from there on; it cannot merge
    Case("alora-llama", "llama", "LoraConfig",
         {"r": 4, "target_modules": ["q_proj", "v_proj"], "alora_invocation_tokens": [5], "task_type": "CAUSAL_LM"},
         mergeable=False),
    # methods other than LoRA
    Case("trainable-tokens-emb", "emb", "TrainableTokensConfig", {"target_modules": ["emb"], "token_indices": [1, 3, 7]}),
    Case("adaption-prompt-llama", "llama", "AdaptionPromptConfig",
         {"adapter_len": 4, "adapter_layers": 1, "task_type": "CAUSAL_LM"}, mergeable=False),
]
