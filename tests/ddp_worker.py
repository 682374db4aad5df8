"""Worker for tests/integrations/test_distributed.py: a few LoRA training steps under DDP or FSDP2 on CPU
(gloo).

Run with `python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py {ddp,fsdp} OUT_DIR`.
"""

from __future__ import annotations

import hashlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastpeft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

import models  # noqa: E402


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def batch_for(rank: int) -> dict[str, torch.Tensor]:
    """Different data on each rank, so equal weights afterwards prove gradients were averaged."""
    ids = (torch.arange(8).repeat(2, 1) + 5 * rank + torch.tensor([[0], [17]])) % 100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def wrap(model, mode: str):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    # auto-wrap unit: a decoder layer (frozen + LoRA params)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    return fully_shard(model)


def adapter_state(peft_model, mode: str) -> dict[str, torch.Tensor]:
    if mode == "ddp":
        return get_peft_model_state_dict(peft_model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(peft_model, options=StateDictOptions(full_state_dict=True))  # on every rank
    return get_peft_model_state_dict(peft_model, state_dict=full)


def save(peft_model, state: dict[str, torch.Tensor], mode: str, folder: str, is_main: bool) -> None:
    """DDP: every rank holds the full adapter. FSDP2: write the gathered `state` (fastpeft's `save_pretrained`
    ignores a `state_dict=` argument, unlike HF PEFT's), so rank 0 writes weights and config itself."""
    if mode == "ddp":
        peft_model.save_pretrained(folder, is_main_process=is_main)
    elif is_main:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(folder, "adapter_model.safetensors"))
        peft_model.peft_config["default"].save_pretrained(folder)


def main(mode: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    peft_model = get_peft_model(models.make_llama(),
                                LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    model = wrap(peft_model, mode)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(3):
        loss = model(**batch_for(rank)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = adapter_state(peft_model, mode)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(digest(state))
    save(peft_model, state, mode, os.path.join(out, f"adapter_rank{rank}"), rank == 0)
    dist.barrier()
    dist.destroy_process_group()
    # every result is on disk: skip the interpreter's teardown, where a native thread left by the CPU
    # collectives sometimes aborts the process ("terminate called without an active exception")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
