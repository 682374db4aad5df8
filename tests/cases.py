"""METHOD_CASES: one row per (method, model, config) for the contract-property matrix.

A row: `Case(id, model, config_cls name, config kwargs, mergeable)`. Adding a method adds rows here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import fastpeft
from fastpeft import registry

from models import MODELS


@dataclass(frozen=True)
class Bug:
    """A library bug a column shows: the test is marked xfail(strict=True) for the exception it raises."""

    reason: str
    raises: type[BaseException] = AssertionError


@dataclass(frozen=True)
class Case:
    id: str
    model: str  # key of tests/models.py MODELS
    method: str  # config class name exported by fastpeft (and by peft, unless hf_method is False)
    kwargs: dict = field(default_factory=dict)
    mergeable: bool = True  # merge_adapter supported for every targeted layer
    identity_init: bool = True
    # the method trains one adapter at a time (AdaLoRA): others are inference-only
    one_trainable: bool = False
    hf_oracle: bool = True  # HF PEFT 0.21.2 handles this row the same way (tests/core/test_oracle_matrix.py)
    # False: a method of fastpeft's own (bottleneck adapters) that HF PEFT lacks: no HF column builds it
    hf_method: bool = True
    hf_same_gradients: bool = True  # False where fastpeft's gradients deliberately differ from HF PEFT's
    # False: HF PEFT is no oracle for the row's float32 adapter loaded onto a half-precision base (the dtype
    # column then checks against the float32 adapter only). FRoD: HF PEFT keeps the U it solved for the basis
    # V rebuilt from the half-precision weights next to the loaded V (another decomposition), so its outputs
    # are off by more than the adapter's effect; fastpeft solves U again for the loaded V.
    hf_half_base: bool = True
    # per column ("checkpointing": tests/core/test_contract_checkpointing.py): why fastpeft refuses it on
    # purpose (the test checks the refusal), and library bugs (a `Bug`, the test is xfail)
    refused: dict = field(default_factory=dict)
    known_bugs: dict = field(default_factory=dict)


# Library bugs the checkpointing column shows. HF PEFT 0.21.2 has both too: its MonteCLoRA gradients change
# under checkpointing, its Poly layers raise "task_ids should not be None" in backward.
MONTECLORA_RECOMPUTE_BUG = Bug(
    "MonteCLoRA under activation checkpointing trains on wrong gradients, silently: each forward takes the "
    "next pre-drawn sample from the sampler's buffer, so the recomputation in backward uses other noise than "
    "the forward")
POLY_RECOMPUTE_BUG = Bug(
    "Poly / MHR cannot train under activation checkpointing: task_ids reach the layers only during the "
    "wrapped call, so the recomputation in backward raises 'Poly adapters need task_ids' although they were "
    "given", ValueError)

# the "unmerge" column: merge_adapter works, unmerge_adapter (and what needs it) is refused with this reason
OSF_NO_UNMERGE = "OSF keeps no copy of the weight from before a merge (HF PEFT 0.21 cannot unmerge either)"

METHOD_CASES = [
    Case("lora-mlp", "mlp", "LoraConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("lora-mlp-save-head", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0"], "modules_to_save": ["head"]}),
    Case("lora-mlp-rslora-bias-dropout", "mlp", "LoraConfig",
         {"r": 4, "lora_alpha": 16, "target_modules": ["lin0", "lin1"], "use_rslora": True, "lora_bias": True,
          "lora_dropout": 0.1}),
    Case("lora-mlp-gaussian-patterns", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": "gaussian",
          "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 32}}),
    Case("lora-mlp-bias-all", "mlp", "LoraConfig", {"r": 4, "target_modules": ["lin1"], "bias": "all"}),
    Case("lora-embedding", "emb", "LoraConfig", {"r": 4, "target_modules": ["emb", "lin"]}),
    Case("lora-gpt2-conv1d", "conv1d_gpt2", "LoraConfig", {"r": 4, "target_modules": ["c_fc", "c_proj"]}),
    Case("lora-conv1d", "conv1d", "LoraConfig", {"r": 4, "target_modules": ["conv0", "conv1"]}),
    Case("lora-conv2d", "conv2d", "LoraConfig", {"r": 4, "target_modules": ["conv0", "conv1"]}),
    Case("lora-conv2d-groups", "conv2d", "LoraConfig", {"r": 4, "target_modules": ["gconv"]},
         mergeable=False),
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
         {"r": 4, "lora_alpha": 16, "target_modules": ["lin0", "lin1"], "use_dora": True,
          "use_rslora": True}),
    Case("dora-embedding", "emb", "LoraConfig", {"r": 4, "target_modules": ["emb", "lin"], "use_dora": True}),
    Case("dora-conv2d", "conv2d", "LoraConfig",
         {"r": 4, "target_modules": ["conv0", "conv1"], "use_dora": True}),
    Case("dora-gpt2-conv1d", "conv1d_gpt2", "LoraConfig",
         {"r": 4, "target_modules": ["c_fc", "c_proj"], "use_dora": True}),
    Case("dora-llama", "llama", "LoraConfig",
         {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True, "task_type": "CAUSAL_LM"}),
    # MiCA / VeLoRA (KaSA truncates the base weight, so identity at init and an untouched base do not hold)
    Case("mica-mlp", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"], "init_lora_weights": "mica"}),
    Case("mica-embedding", "emb", "LoraConfig",
         {"r": 4, "target_modules": ["emb", "lin"], "init_lora_weights": "mica"}),
    Case("velora-mlp", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"], "velora_config": {"num_groups": 4}}),
    Case("velora-llama", "llama", "LoraConfig",
         {"r": 4, "target_modules": ["q_proj", "v_proj"], "velora_config": {"num_groups": 8},
          "task_type": "CAUSAL_LM"}),
    # BD-LoRA; MonteCLoRA (stochastic only in training mode: the contract checks run in eval mode, plain LoRA
    # there)
    Case("bdlora-mlp", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"],
          "use_bdlora": {"target_modules_bd_a": ["lin1"], "target_modules_bd_b": ["lin0"], "nblocks": 2}}),
    Case("bdlora-llama", "llama", "LoraConfig",
         {"r": 4, "target_modules": ["q_proj", "o_proj"], "task_type": "CAUSAL_LM",
          "use_bdlora": {"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj"],
                         "nblocks": 2}}),
    Case("monteclora-mlp", "mlp", "LoraConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"],
          "monteclora_config": {"num_samples": 2, "buffer_size": 2}},
         known_bugs={"checkpointing": MONTECLORA_RECOMPUTE_BUG}),
    # aLoRA: token 5 occurs in both rows of llama_inputs, so the adapter acts from there on; it cannot merge
    Case("alora-llama", "llama", "LoraConfig",
         {"r": 4, "target_modules": ["q_proj", "v_proj"], "alora_invocation_tokens": [5],
          "task_type": "CAUSAL_LM"},
         mergeable=False,
         refused={"checkpointing": "the recomputed forward would not see the per-call invocation offsets"}),
    # LN tuning (trained copies of norm layers; default targets per model type), HRA, MiSS (balance / bat
    # / mini)
    Case("ln-tuning-mlp", "mlp", "LNTuningConfig", {"target_modules": ["lin1"]}),
    Case("ln-tuning-llama", "llama", "LNTuningConfig", {"task_type": "CAUSAL_LM"}),
    Case("ln-tuning-gpt2", "gpt2", "LNTuningConfig", {"task_type": "CAUSAL_LM"}),
    Case("hra-mlp", "mlp", "HRAConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("hra-conv2d", "conv2d", "HRAConfig", {"r": 4, "target_modules": ["conv0"]}),
    Case("hra-mlp-bias-only", "mlp", "HRAConfig", {"r": 2, "target_modules": ["lin1"], "bias": "hra_only"}),
    Case("hra-llama", "llama", "HRAConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    # Lily: A / B shared across layers, a router mixing the Bs from the batch's tokens: no merged form
    Case("lily-mlp", "mlp", "LilyConfig", {"r": 4, "num_B": 2, "target_modules": ["lin0", "lin1"]},
         mergeable=False),
    Case("lily-llama", "llama", "LilyConfig", {"r": 4, "stride_A": 2, "task_type": "CAUSAL_LM"},
         mergeable=False),
    # GLoRA: W0 + W0 * A + B and b0 + b0 * D + E + W0 @ C (plain nn.Linear only)
    Case("glora-mlp", "mlp", "GloraConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("glora-mlp-vectors-bias-only", "mlp", "GloraConfig",
         {"target_modules": ["lin0", "lin1"], "config_A_B": "vector", "config_C": "vector",
          "config_D_E": "vector", "bias": "glora_only"}),
    Case("glora-llama", "llama", "GloraConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    Case("miss-mlp", "mlp", "MissConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("miss-mlp-bat", "mlp", "MissConfig",
         {"r": 2, "target_modules": ["lin0", "lin1"], "init_weights": "bat"}),
    Case("miss-mlp-mini", "mlp", "MissConfig",
         {"r": 4, "mini_r": 5, "target_modules": ["lin0", "lin1"], "init_weights": "mini"}),
    Case("miss-llama", "llama", "MissConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    # LoHa / LoKr (LyCORIS): Linear, Conv1d, Conv2d (incl. grouped; CP-factored kernels), default targets
    Case("loha-mlp", "mlp", "LoHaConfig", {"r": 4, "alpha": 8, "target_modules": ["lin0", "lin1"]}),
    Case("loha-conv1d", "conv1d", "LoHaConfig", {"r": 2, "target_modules": ["conv0", "conv1"]}),
    # HF PEFT 0.21's hand-written backward of the effective-conv (CP) form gets hada_w1_a / hada_w2_a wrong;
    # fastpeft uses autograd (checked with gradcheck in tests/methods/test_loha.py)
    Case("loha-conv2d-effective", "conv2d", "LoHaConfig",
         {"r": 2, "alpha": 64, "target_modules": ["conv0", "gconv", "conv1"], "use_effective_conv2d": True},
         hf_same_gradients=False),
    Case("loha-llama", "llama", "LoHaConfig",
         {"r": 4, "task_type": "CAUSAL_LM", "rank_pattern": {"v_proj": 2}}),
    Case("lokr-mlp-decompose-both", "mlp", "LoKrConfig",
         {"r": 1, "target_modules": ["lin0", "lin1"], "decompose_both": True}),
    Case("lokr-conv2d", "conv2d", "LoKrConfig", {"r": 2, "target_modules": ["conv0", "gconv", "conv1"]}),
    Case("lokr-bert-cls", "bert_cls", "LoKrConfig", {"r": 2, "task_type": "SEQ_CLS", "decompose_factor": 4}),
    # methods other than LoRA
    Case("trainable-tokens-emb", "emb", "TrainableTokensConfig",
         {"target_modules": ["emb"], "token_indices": [1, 3, 7]}),
    Case("adaption-prompt-llama", "llama", "AdaptionPromptConfig",
         {"adapter_len": 4, "adapter_layers": 1, "task_type": "CAUSAL_LM"}, mergeable=False),
    # VeRA / RandLoRA: frozen random projections shared by all layers (small alpha: RandLoRA's default 640 / r
    # blows perturbed outputs up beyond the contract's float tolerance)
    Case("vera-mlp", "mlp", "VeraConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("vera-mlp-bias-save-head", "mlp", "VeraConfig",
         {"r": 4, "target_modules": ["lin0"], "bias": "vera_only", "modules_to_save": ["head"]}),
    Case("vera-gpt2-conv1d", "conv1d_gpt2", "VeraConfig", {"r": 4, "target_modules": ["c_fc", "c_proj"]}),
    Case("vera-llama", "llama", "VeraConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    Case("randlora-mlp", "mlp", "RandLoraConfig",
         {"r": 4, "randlora_alpha": 8, "target_modules": ["lin0", "lin1", "head"]}),
    Case("randlora-mlp-sparse-no-projection", "mlp", "RandLoraConfig",
         {"r": 3, "randlora_alpha": 6, "target_modules": ["lin0", "lin1"], "sparse": True,
          "save_projection": False}),
    Case("randlora-gpt2-conv1d", "conv1d_gpt2", "RandLoraConfig",
         {"r": 4, "randlora_alpha": 8, "target_modules": ["c_fc", "c_proj"], "very_sparse": True}),
    Case("randlora-llama", "llama", "RandLoraConfig",
         {"r": 8, "randlora_alpha": 16, "task_type": "CAUSAL_LM"}),
    # PVeRA: VeRA with a sampled latent (training mode; eval mode uses its mean, which is what merges). A
    # private generator (generator_seed) cannot be replayed by activation checkpointing: refused there
    Case("pvera-mlp", "mlp", "PveraConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("pvera-mlp-bias-seeded-save-head", "mlp", "PveraConfig",
         {"r": 4, "target_modules": ["lin0"], "bias": "pvera_only", "modules_to_save": ["head"],
          "generator_seed": 3},
         refused={"checkpointing": "the noise of a private generator is not replayed in the recomputation"}),
    Case("pvera-gpt2-conv1d", "conv1d_gpt2", "PveraConfig", {"r": 4, "target_modules": ["c_fc", "c_proj"]}),
    Case("pvera-llama", "llama", "PveraConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    # Poly / MHR: inputs carry task_ids (one per row); the per-task update has no merged form
    # HF PEFT's PeftModel hands task_ids to a custom model instead of its Poly layers: the oracle matrix
    # cannot call it; tests/methods/test_poly.py compares with HF on T5 / llama and through HF's base_model
    Case("poly-mlp", "mlp_tasks", "PolyConfig",
         {"r": 4, "n_tasks": 3, "n_skills": 3, "target_modules": ["lin0", "lin1"]}, mergeable=False,
         hf_oracle=False, known_bugs={"checkpointing": POLY_RECOMPUTE_BUG}),
    Case("poly-mhr-mlp", "mlp_tasks", "PolyConfig",
         {"r": 4, "n_tasks": 3, "n_skills": 2, "n_splits": 2, "target_modules": ["lin0", "lin1"]},
         mergeable=False, hf_oracle=False, known_bugs={"checkpointing": POLY_RECOMPUTE_BUG}),
    # IA3: vectors rescale outputs, or inputs of feedforward_modules; default targets for llama / bert
    Case("ia3-mlp", "mlp", "IA3Config",
         {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}),
    Case("ia3-mlp-save-head", "mlp", "IA3Config",
         {"target_modules": ["lin0"], "feedforward_modules": [], "modules_to_save": ["head"]}),
    Case("ia3-gpt2-conv1d", "conv1d_gpt2", "IA3Config",
         {"target_modules": ["c_fc", "c_proj"], "feedforward_modules": ["c_proj"]}),
    Case("ia3-conv2d", "conv2d", "IA3Config",
         {"target_modules": ["conv0", "gconv", "conv1"], "feedforward_modules": ["gconv"]}),
    Case("ia3-conv3d", "conv3d", "IA3Config",
         {"target_modules": ["conv0", "conv1"], "feedforward_modules": ["conv1"]}),
    Case("ia3-llama", "llama", "IA3Config", {"task_type": "CAUSAL_LM"}),
    Case("ia3-bert-cls", "bert_cls", "IA3Config", {"task_type": "SEQ_CLS"}),
    # FourierFT (init_weights=True: zero spectrum, identity at init); VB-LoRA (random bank and logits: no
    # identity)
    Case("fourierft-mlp", "mlp", "FourierFTConfig",
         {"target_modules": ["lin0", "lin1"], "n_frequency": 30, "init_weights": True}),
    Case("fourierft-gpt2-conv1d", "conv1d_gpt2", "FourierFTConfig",
         {"target_modules": ["c_fc", "c_proj"], "n_frequency": 40, "init_weights": True}),
    Case("fourierft-llama", "llama", "FourierFTConfig", {"task_type": "CAUSAL_LM", "n_frequency": 50,
                                                         "init_weights": True}),
    # GraLoRA: a gralora_k x gralora_k grid of rank r / gralora_k block updates (B zero at init), optional
    # hybrid LoRA pair
    Case("gralora-mlp", "mlp", "GraloraConfig", {"r": 4, "gralora_k": 2, "target_modules": ["lin0", "lin1"]}),
    Case("gralora-mlp-hybrid-bias", "mlp", "GraloraConfig",
         {"r": 5, "gralora_k": 5, "hybrid_r": 2, "target_modules": ["lin0", "lin1"], "bias": "gralora_only"}),
    Case("gralora-gpt2-conv1d", "conv1d_gpt2", "GraloraConfig",
         {"r": 4, "gralora_k": 2, "target_modules": ["c_fc", "c_proj"]}),
    Case("gralora-llama", "llama", "GraloraConfig", {"r": 8, "gralora_k": 4, "task_type": "CAUSAL_LM"}),
    # PEANuT: the update is a small network of the frozen weight (B zero at init); merges remember W0
    Case("peanut-mlp", "mlp", "PeanutConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("peanut-mlp-deep", "mlp", "PeanutConfig",
         {"r": 3, "depth": 2, "act_fn": "gelu", "target_modules": ["lin0", "lin1", "head"]}),
    Case("peanut-llama", "llama", "PeanutConfig", {"r": 4, "depth": 1, "task_type": "CAUSAL_LM"}),
    # SHiRA: r * (in + out) trained weight entries at seeded random positions (saved with the adapter)
    Case("shira-mlp", "mlp", "ShiraConfig", {"r": 2, "target_modules": ["lin0", "lin1"], "random_seed": 3}),
    Case("shira-mlp-save-head", "mlp", "ShiraConfig",
         {"r": 1, "target_modules": ["lin0"], "modules_to_save": ["head"]}),
    Case("shira-llama", "llama", "ShiraConfig", {"r": 2, "task_type": "CAUSAL_LM", "random_seed": 42}),
    # BEFT: a trained bias on each target's output; merging adds it to the base bias (tiny llama's v_proj has
    # none: its merge is refused)
    Case("beft-mlp", "mlp", "BeftConfig", {"target_modules": ["lin0", "lin1"]}),
    Case("beft-llama", "llama", "BeftConfig", {"task_type": "CAUSAL_LM"}, mergeable=False),
    Case("beft-bert-cls", "bert_cls", "BeftConfig", {"task_type": "SEQ_CLS"}),
    Case("vblora-mlp", "mlp", "VBLoRAConfig",
         {"target_modules": ["lin0", "lin1"], "r": 2, "vector_length": 10, "num_vectors": 16},
         identity_init=False),
    Case("vblora-gpt2-conv1d", "conv1d_gpt2", "VBLoRAConfig",
         {"target_modules": ["c_fc", "c_proj"], "r": 2, "vector_length": 2, "num_vectors": 8,
          "init_vector_bank_bound": 0.5}, identity_init=False),
    Case("vblora-llama", "llama", "VBLoRAConfig",
         {"task_type": "CAUSAL_LM", "r": 2, "vector_length": 8, "num_vectors": 12}, identity_init=False),
    # OFT / BOFT: orthogonal rotations of the layer input (OFT on a k x k Conv2d is not its merged form, as in
    # HF: no contract row there; see tests/methods/test_oft.py)
    Case("oft-mlp", "mlp", "OFTConfig", {"target_modules": ["lin0", "lin1"], "oft_block_size": 5}),
    Case("oft-mlp-exact-coft-share", "mlp", "OFTConfig",
         {"target_modules": ["lin0", "lin1"], "r": 2, "oft_block_size": 0, "use_cayley_neumann": False,
          "coft": True, "eps": 0.1, "block_share": True}),
    Case("oft-embedding", "emb", "OFTConfig", {"target_modules": ["emb", "lin"], "oft_block_size": 3}),
    Case("oft-llama", "llama", "OFTConfig", {"task_type": "CAUSAL_LM", "oft_block_size": 8}),
    Case("oft-bert-cls", "bert_cls", "OFTConfig", {"task_type": "SEQ_CLS", "oft_block_size": 8}),
    Case("boft-mlp", "mlp", "BOFTConfig", {"target_modules": ["lin0", "lin1"], "boft_block_size": 5}),
    Case("boft-mlp-blocknum-bias", "mlp", "BOFTConfig",
         {"target_modules": ["lin0", "lin1", "head"], "boft_block_size": 0, "boft_block_num": 2,
          "bias": "boft_only"}),
    Case("boft-conv2d", "conv2d", "BOFTConfig", {"target_modules": ["conv0"], "boft_block_size": 6}),
    Case("boft-llama", "llama", "BOFTConfig", {"task_type": "CAUSAL_LM", "boft_block_size": 8}),
    # PSOFT: an r x r Cayley rotation between frozen SVD factors of the weight (R = I at init: identity)
    Case("psoft-mlp", "mlp", "PsoftConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("psoft-mlp-neumann-lowrank", "mlp", "PsoftConfig",
         {"r": 4, "target_modules": ["lin0", "lin1"], "use_cayley_neumann": True,
          "num_cayley_neumann_terms": 4, "cayley_neumann_eps": 0.1, "psoft_svd": "lowrank",
          "psoft_svd_lowrank_niter": 3, "random_seed": 7, "psoft_mag_b": False}),
    Case("psoft-llama", "llama", "PsoftConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    # C3A: block-circulant updates (default init xavier_uniform: no identity; block_size divides every
    # target's sizes). HF PEFT 0.21's FFT backward gets the input gradient wrong: stacked C3A layers train
    # differently there (tests/methods/test_c3a.py)
    Case("c3a-mlp", "mlp", "C3AConfig", {"block_size": 10, "target_modules": ["lin0", "lin1"]},
         identity_init=False, hf_same_gradients=False),
    Case("c3a-mlp-bias-only", "mlp", "C3AConfig",
         {"block_size": 5, "target_modules": ["lin1"], "bias": "c3a_only", "init_weights": True}),
    Case("c3a-llama", "llama", "C3AConfig", {"block_size": 16, "task_type": "CAUSAL_LM"},
         identity_init=False, hf_same_gradients=False),
    # DeLoRA: a rank-r update with a trained norm bound (B = 0 at init: identity)
    Case("delora-mlp", "mlp", "DeloraConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("delora-mlp-bias-only", "mlp", "DeloraConfig",
         {"r": 2, "target_modules": ["lin1"], "bias": "delora_only", "delora_lambda": 5}),
    Case("delora-llama", "llama", "DeloraConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    # RoAd: scaled rotations of output feature pairs (angle 0, scale 1 at init: identity); group_size must
    # divide every target's output size
    Case("road-mlp", "mlp", "RoadConfig", {"group_size": 4, "target_modules": ["lin0", "lin1"]}),
    Case("road-mlp-road4", "mlp", "RoadConfig",
         {"variant": "road_4", "group_size": 10, "target_modules": ["lin0", "lin1"]}),
    Case("road-llama", "llama", "RoadConfig", {"group_size": 8, "task_type": "CAUSAL_LM"}),
    Case("road-bert-cls", "bert_cls", "RoadConfig",
         {"variant": "road_2", "group_size": 16, "task_type": "SEQ_CLS"}),
    # OSF: the low singular triplets of each weight train, gradients kept off the frozen top subspace; merges
    # as HF PEFT, unmerging refused (HF PEFT 0.21 cannot either)
    Case("osf-mlp", "mlp", "OSFConfig", {"target_modules": ["lin0", "lin1"]},
         refused={"unmerge": OSF_NO_UNMERGE}),
    Case("osf-mlp-random-patterns", "mlp", "OSFConfig",
         {"target_modules": ["lin0", "lin1"], "effective_rank": 0.3, "rank_pattern": {"lin1": 4},
          "init_weights": False}, identity_init=False, refused={"unmerge": OSF_NO_UNMERGE}),
    Case("osf-llama", "llama", "OSFConfig", {"effective_rank": 8, "task_type": "CAUSAL_LM"},
         refused={"unmerge": OSF_NO_UNMERGE}),
    # Super-Tuning: magnitude-chosen weight entries trained (zero at init), optionally a LoRA pair (Supra).
    # (save_precomputed_indices=False re-chooses them from the base weight on load: on a bf16 / fp16 base that
    # choice differs from the float32 one, so it is tested in tests/methods/test_supertuning.py, not here)
    Case("supertuning-mlp", "mlp", "SupertuningConfig",
         {"target_modules": ["lin0", "lin1"], "sparsity": 0.9}),
    Case("supertuning-mlp-supra", "mlp", "SupertuningConfig",
         {"target_modules": ["lin0", "lin1", "head"], "sparsity": 0.8, "r": 2, "lora_alpha": 8,
          "lora_dropout": 0.1}),
    Case("supertuning-mlp-bottom", "mlp", "SupertuningConfig",
         {"target_modules": ["lin1"], "sparsity": 0.5, "select_top": False}),
    Case("supertuning-llama", "llama", "SupertuningConfig", {"sparsity": 0.9, "task_type": "CAUSAL_LM"}),
    # Uni-LoRA: every layer's factors read from one trained vector (uniform init: no identity; a wider init
    # bound than the default 0.02 so that one SGD step visibly moves the outputs)
    Case("unilora-mlp", "mlp", "UniLoraConfig", {"r": 4, "target_modules": ["lin0", "lin1"],
                                                  "theta_d_length": 32, "init_theta_d_bound": 0.5},
         identity_init=False),
    Case("unilora-mlp-bias-only", "mlp", "UniLoraConfig",
         {"r": 2, "target_modules": ["lin1"], "bias": "unilora_only", "theta_d_length": 16},
         identity_init=False),
    Case("unilora-gpt2-conv1d", "conv1d_gpt2", "UniLoraConfig",
         {"r": 2, "target_modules": ["c_fc", "c_proj"], "theta_d_length": 24, "init_theta_d_bound": 0.5},
         identity_init=False),
    Case("unilora-llama", "llama", "UniLoraConfig", {"r": 4, "task_type": "CAUSAL_LM"}, identity_init=False),
    # DEFT: a trained output subspace of each weight replaced (identity at init: R = relu(P)^T W); PaRa
    # removes it only (never an identity)
    Case("deft-mlp", "mlp", "DeftConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("deft-mlp-qr-alpha-bias-only", "mlp", "DeftConfig",
         {"r": 2, "target_modules": ["lin1", "head"], "decomposition_method": "qr", "alpha": 4,
          "bias": "deft_only"}),
    Case("deft-mlp-para", "mlp", "DeftConfig", {"r": 2, "target_modules": ["lin0"], "para": True},
         identity_init=False),
    Case("deft-gpt2-conv1d", "conv1d_gpt2", "DeftConfig",
         {"r": 2, "target_modules": ["c_fc", "c_proj"], "decomposition_method": "qr"}),
    Case("deft-llama", "llama", "DeftConfig", {"r": 4, "task_type": "CAUSAL_LM"}),
    # FRoD: U is solved again for a loaded basis V, which HF PEFT does not do (see Case.hf_half_base)
    Case("frod-mlp", "mlp", "FrodConfig",
         {"target_modules": ["lin0", "lin1"], "sparse_rate": 0.1, "progressbar": False}, hf_half_base=False),
    Case("frod-mlp-bias-only", "mlp", "FrodConfig",
         {"target_modules": ["lin1"], "bias": "frod_only", "sparse_rate": 0.05, "progressbar": False},
         hf_half_base=False),
    Case("frod-llama", "llama", "FrodConfig", {"task_type": "CAUSAL_LM", "progressbar": False},
         hf_half_base=False),
    # HiRA: W0 modulated by a rank-r product, W0 * (B A) added (B = 0, or A = 0 for embeddings, at init). A
    # step moves B by about lr * W0 * ..., and the output by W0 * dB A: on small base weights (init std 0.02)
    # random factors (init_weights=False) make one SGD step visible
    Case("hira-mlp", "mlp", "HiraConfig", {"r": 4, "target_modules": ["lin0", "lin1"]}),
    Case("hira-gpt2-conv1d", "conv1d_gpt2", "HiraConfig",
         {"r": 4, "target_modules": ["c_fc", "c_proj"], "fan_in_fan_out": True, "init_weights": False},
         identity_init=False),
    Case("hira-llama", "llama", "HiraConfig", {"r": 4, "task_type": "CAUSAL_LM", "init_weights": False},
         identity_init=False),
    Case("hira-embedding", "emb", "HiraConfig", {"r": 3, "target_modules": ["emb", "lin"]}),
    Case("hira-conv1d", "conv1d", "HiraConfig", {"r": 3, "target_modules": ["conv0", "conv1"]}),
    Case("hira-conv2d", "conv2d", "HiraConfig",
         {"r": 3, "target_modules": ["conv0", "conv1"], "init_weights": False}, identity_init=False),
    Case("hira-conv3d", "conv3d", "HiraConfig",
         {"r": 3, "target_modules": ["conv0", "conv1"], "init_weights": False}, identity_init=False),
    # TinyLoRA: a trained v (zero at init: identity) mixing seeded P between frozen SVD factors; weight_tying
    # shares v between layers, r is clipped to small layers (head: 2) as in HF PEFT
    Case("tinylora-mlp", "mlp", "TinyLoraConfig", {"r": 2, "u": 8, "target_modules": ["lin0", "lin1"]}),
    Case("tinylora-mlp-tied-bias-only", "mlp", "TinyLoraConfig",
         {"r": 3, "u": 4, "target_modules": ["lin0", "lin1", "head"], "weight_tying": 1.0,
          "bias": "tinylora_only"}),
    Case("tinylora-mlp-no-projection", "mlp", "TinyLoraConfig",
         {"r": 2, "u": 5, "target_modules": ["lin0", "lin1", "head"], "weight_tying": 0.5,
          "save_projection": False}),
    Case("tinylora-embedding", "emb", "TinyLoraConfig", {"r": 2, "u": 4, "target_modules": ["emb", "lin"]}),
    Case("tinylora-gpt2-conv1d", "conv1d_gpt2", "TinyLoraConfig",
         {"r": 2, "u": 4, "target_modules": ["c_fc", "c_proj"]}),
    Case("tinylora-llama", "llama", "TinyLoraConfig", {"r": 2, "u": 8, "task_type": "CAUSAL_LM"}),
    # WaveFT: sparse coefficients through the inverse 2-D wavelet transform (zero init: identity)
    Case("waveft-mlp", "mlp", "WaveFTConfig", {"target_modules": ["lin0", "lin1"], "n_frequency": 30}),
    Case("waveft-mlp-sym-bias", "mlp", "WaveFTConfig",
         {"target_modules": ["lin0", "lin1"], "n_frequency": 25, "wavelet_family": "sym4", "scaling": 3.0,
          "bias": "waveft_only"}),
    Case("waveft-gpt2-conv1d", "conv1d_gpt2", "WaveFTConfig",
         {"target_modules": ["c_fc", "c_proj"], "n_frequency": 40, "wavelet_family": "coif1"}),
    Case("waveft-llama", "llama", "WaveFTConfig", {"task_type": "CAUSAL_LM", "n_frequency": 50,
                                                   "wavelet_family": "db3"}),
    # AdaLoRA: random E (init_lora_weights=False) so that one SGD step visibly moves the outputs
    Case("adalora-mlp", "mlp", "AdaLoraConfig",
         {"init_r": 4, "target_r": 2, "target_modules": ["lin0", "lin1"], "total_step": 10,
          "init_lora_weights": False}, identity_init=False, one_trainable=True),
    Case("adalora-llama", "llama", "AdaLoraConfig",
         {"init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"], "total_step": 10,
          "init_lora_weights": False, "task_type": "CAUSAL_LM"}, identity_init=False, one_trainable=True),
    # AdaMSS: per-cluster low-rank updates in the weight's top-r singular subspace (B = 0 at init: identity;
    # init_weights=None: small random B). The clusters are rebuilt from the base weight, so they must come out
    # the same on a bf16 / fp16 base for the dtype column (true for these rows; not for llama with r=8: a file
    # whose clusters differ is refused, tests/methods/test_adamss.py)
    Case("adamss-mlp", "mlp", "AdamssConfig",
         {"r": 4, "num_subspaces": 3, "subspace_rank": 2, "target_modules": ["lin0", "lin1"]}),
    Case("adamss-mlp-random-dynamic", "mlp", "AdamssConfig",
         {"r": 6, "num_subspaces": 3, "subspace_rank": 3, "target_modules": ["lin0", "lin1"],
          "init_weights": None, "use_dynamic_rank": True, "svd_threshold": 0.05}, identity_init=False),
    Case("adamss-llama", "llama", "AdamssConfig",
         {"r": 6, "num_subspaces": 3, "subspace_rank": 2, "task_type": "CAUSAL_LM"}),
    # Bottleneck adapters: fastpeft's own method (HF PEFT has none, so no HF-oracle column; the adapters
    # library is the oracle, tests/methods/test_bottleneck.py). Non-linear: merging is refused. Pfeiffer with
    # the "bert" init is not identity at init; the others are (mam_adapter init: zero up-projection).
    Case("bottleneck-bert-pfeiffer", "bert_cls", "BottleneckConfig",
         {"reduction_factor": 4, "task_type": "SEQ_CLS"},
         mergeable=False, identity_init=False, hf_oracle=False, hf_method=False),
    Case("bottleneck-bert-houlsby-options", "bert_cls", "BottleneckConfig",
         {"mh_adapter": True, "original_ln_before": False, "non_linearity": "swish", "reduction_factor": 8,
          "ln_after": True, "scaling": "learned", "use_gating": True, "init_weights": "mam_adapter",
          "task_type": "SEQ_CLS"}, mergeable=False, hf_oracle=False, hf_method=False),
    Case("bottleneck-bert-parallel", "bert_cls", "BottleneckConfig",
         {"original_ln_before": False, "reduction_factor": 2, "init_weights": "mam_adapter",
          "is_parallel": True, "scaling": 4.0, "task_type": "SEQ_CLS"}, mergeable=False, hf_oracle=False,
         hf_method=False),
]


def config_class(name: str):
    """The registered config class called `name` (found through the registry: no export needed)."""
    return next(spec.config_cls for spec in registry.registered().values()
                if spec.config_cls.__name__ == name)


def perturb(model, scale: float = 0.1, seed: int = 0, only: str = "") -> None:
    """Move every trainable tensor whose name holds `only` off its init by seeded noise, in name order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad and only in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def build(case, seed_adapter: bool = False, base=None):
    """The row's adapted model (on `base`, else a fresh base model) in eval mode, and the row's inputs."""
    factory, inputs_fn = MODELS[case.model]
    config = config_class(case.method)(**copy.deepcopy(case.kwargs))
    model = fastpeft.get_peft_model(factory() if base is None else base, config)
    model.eval()
    if seed_adapter:
        perturb(model)
    return model, inputs_fn()


@dataclass(frozen=True)
class PromptCase:
    """A soft-prompt method (a tests/prompt_helpers.py METHODS key) on the llama model, in the checkpointing
    and dtype columns (tests/core/test_contract_checkpointing.py, tests/core/test_contract_dtype.py)."""

    method: str
    refused: dict = field(default_factory=dict)
    known_bugs: dict = field(default_factory=dict)


PREFIX_CHECKPOINTING = "transformers drops the cache, which holds the prefix, inside checkpointed layers"
PREFIX_LATE_CHECKPOINTING_BUG = Bug(
    "Prefix tuning on a model whose checkpointing is switched on after wrapping: get_peft_model's clear "
    "ValueError never comes, the training forward fails with a shape RuntimeError in the attention (the "
    "prefix is dropped)", RuntimeError)
PROMPT_CASES = [PromptCase("prompt_tuning"), PromptCase("p_tuning_mlp"), PromptCase("p_tuning_lstm")] + [
    PromptCase(m, refused={"checkpointing": PREFIX_CHECKPOINTING},
               known_bugs={"checkpointing": PREFIX_LATE_CHECKPOINTING_BUG})
    for m in ("prefix", "prefix_projection", "cartridge")]  # cartridges are served as the same cache


def table_row(case_id: str) -> tuple[str, dict]:
    """A METHOD_CASES row as a method file's CaseTable entry (model, config kwargs): a case that both tables
    use is written once, here."""
    case = next(c for c in METHOD_CASES if c.id == case_id)
    return case.model, copy.deepcopy(case.kwargs)
