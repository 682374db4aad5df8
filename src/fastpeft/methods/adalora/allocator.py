"""`RankAllocator`: AdaLoRA's importance-driven pruning of singular triplets (Zhang et al., 2023,
sec. 3.2-3.3).

Per adapter tensor entry, importance I = |w * dL/dw| is smoothed (sensitivity, EMA with beta1) and its
deviation tracked (uncertainty, EMA with beta2); an entry's score is their product. A triplet's score is its E
entry's score plus the mean score of its row of A and of its column of B. At each allocation step the
lowest-scoring triplets over all layers are masked (E set to 0) until only the step's budget of triplets
remains.

Keys of `rank_pattern` are '<module path>.lora_E.<adapter>' (module paths inside the user's model), as HF
PEFT.
"""

from __future__ import annotations

import torch

PARTS = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    """Keeps the EMAs of one trainable adapter and turns them into masks and a rank pattern."""

    def __init__(self, layers: dict[str, object], config, adapter_name: str) -> None:
        """`layers`: module path -> AdaLoRA layer holding `adapter_name` (in model order)."""
        self.config = config
        self.adapter_name = adapter_name
        self.layers = layers
        self.init_bgt = sum(layer.lora_A[adapter_name].shape[0] for layer in layers.values())
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def key(self, path: str, part: str) -> str:
        return f"{path}.{part}.{self.adapter_name}"

    # ---- the budget: constant during warm-up, cubic decrease, then the target
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(number of triplets kept at `step`, whether to re-mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (remaining ** 3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    # ---- importance
    def update_ipt(self) -> None:
        """Fold this step's |w * grad| of every A, B, E entry into the sensitivity and uncertainty EMAs."""
        b1, b2 = self.config.beta1, self.config.beta2
        for path, layer in self.layers.items():
            for part in PARTS:
                param = getattr(layer, part)[self.adapter_name]
                if param.grad is None:
                    raise RuntimeError(
                        f"AdaLoRA: {path}.{part}.{self.adapter_name} has no gradient. Call "
                        "update_and_allocate() after loss.backward() (and optimizer.step()) but before "
                        "optimizer.zero_grad()."
                    )
                n = self.key(path, part)
                with torch.no_grad():
                    ipt = (param * param.grad).abs().detach()
                    avg = self.exp_avg_ipt.get(n, torch.zeros_like(param))
                    unc = self.exp_avg_unc.get(n, torch.zeros_like(param))
                    avg = b1 * avg + (1 - b1) * ipt
                    self.ipt[n], self.exp_avg_ipt[n] = ipt, avg
                    self.exp_avg_unc[n] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def element_score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """module path -> score of each of its triplets, shape (r,)."""
        scores = {}
        for path in self.layers:
            row_a = self.element_score(self.key(path, "lora_A")).mean(dim=1, keepdim=True)
            col_b = self.element_score(self.key(path, "lora_B")).mean(dim=0).view(-1, 1)
            vectors = torch.cat([row_a, col_b], dim=1).sum(dim=1)
            scores[path] = self.element_score(self.key(path, "lora_E")).view(-1) + vectors.view(-1)
        return scores

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the E entries of all but the `budget` best triplets (ties at the threshold are pruned)."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:  # nothing to prune (HF PEFT's kthvalue would fail here)
            keep = {path: torch.ones_like(s, dtype=torch.bool) for path, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
            keep = {path: ~(s <= threshold) for path, s in scores.items()}
        pattern = {}
        for path, flags in keep.items():
            self.layers[path].mask_triplets(self.adapter_name, flags)
            pattern[self.key(path, "lora_E")] = flags.view(-1).tolist()
        return pattern

    def update_and_allocate(self, step: int, force_mask: bool = False) -> tuple[int, dict | None]:
        if step < self.config.total_step - self.config.tfinal:
            self.update_ipt()
        budget, mask_now = self.budget_schedule(step)
        pattern = self.mask_to_budget(budget) if (mask_now or force_mask) else None
        return budget, pattern

    def mask_using_rank_pattern(self, rank_pattern: dict[str, list[bool]]) -> None:
        """Re-apply a stored pattern (keys with or without the adapter name) during the final phase."""
        if not rank_pattern:
            raise RuntimeError(
                "AdaLoRA: update_and_allocate() reached the final phase (step > total_step - tfinal) without "
                "a rank_pattern: call it at every training step from step 0 so the budget phase can run."
            )
        for path, layer in self.layers.items():
            full, short = self.key(path, "lora_E"), f"{path}.lora_E"
            flags = rank_pattern[full] if full in rank_pattern else rank_pattern[short]
            if len(flags) != layer.r[self.adapter_name] and sum(flags) == layer.r[self.adapter_name]:
                continue  # loaded already shrunk to this pattern: every remaining triplet is kept
            layer.mask_triplets(self.adapter_name, torch.tensor(flags, dtype=torch.bool))
