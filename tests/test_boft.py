"""BOFT against HF PEFT 0.21.2: files both ways, outputs, gradients (block dropout too), merging, butterflies."""

from __future__ import annotations

import copy

import pytest
import torch

from test_oft import (
    close,
    close_states,
    compare_saved_configs,
    compare_saved_files,
    copy_hf_into_fastpeft,
    differs,
    training_grads,
)

import models

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as hf_boft_layer  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.methods import orthogonal as orth  # noqa: E402
from fastpeft.methods.boft import BOFTConfig  # noqa: E402


def make_square_mlp():
    torch.manual_seed(7)
    return models.MLP(16, 16, 3).eval()


def square_inputs():
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(3))


MODELS = {**models.MODELS, "square": (make_square_mlp, square_inputs)}

CASES = {
    "mlp": ("mlp", dict(target_modules=["lin0", "lin1"], boft_block_size=5)),
    "mlp_dropout": ("mlp", dict(target_modules=["lin0", "lin1"], boft_block_size=2, boft_dropout=0.5)),
    "mlp_blocknum_bias": ("mlp", dict(target_modules=["lin0", "lin1", "head"], boft_block_size=0,
                                      boft_block_num=2, bias="boft_only")),
    "conv2d": ("conv2d", dict(target_modules=["conv0"], boft_block_size=6)),
    "llama": ("llama", dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"],
                            boft_block_size=8)),
    "bert": ("bert_cls", dict(task_type="SEQ_CLS", boft_block_size=8)),
    # butterflies (> 1 factor) need HF's CUDA kernel: compared with the `hf_butterfly` fixture's stand-in
    "butterfly2": ("square", dict(target_modules=["lin0", "lin1"], boft_block_size=2, boft_n_butterfly_factor=2)),
    "butterfly3": ("square", dict(target_modules=["lin0", "lin1"], boft_block_size=0, boft_block_num=8,
                                  boft_n_butterfly_factor=3, boft_dropout=0.3)),
}
BUTTERFLY = ["butterfly2", "butterfly3"]


class _BlockDiagKernel:
    """What HF's fbd_cuda extension computes: a block-diagonal matrix per butterfly factor (and its gradient)."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad, blocks):
        size = blocks.shape[-1]
        parts = [grad[:, i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(blocks.shape[1])]
        return [torch.stack(parts, dim=1)]


@pytest.fixture(autouse=True)
def hf_butterfly(request, monkeypatch):
    """HF PEFT silently uses one factor without its CUDA extension; butterfly cases give it a PyTorch kernel."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("case") in BUTTERFLY:
        monkeypatch.setattr(hf_boft_layer, "get_fbd_cuda", lambda: _BlockDiagKernel())


def config(lib, case, **extra):
    kw = {**copy.deepcopy(CASES[case][1]), **extra}
    if "task_type" in kw:
        kw["task_type"] = getattr(lib.TaskType, kw["task_type"])
    return (BOFTConfig if lib is fastpeft else lib.BOFTConfig)(**kw)


def factory(case):
    return MODELS[CASES[case][0]][0]


def build(lib, case, seed=0, **extra):
    model = lib.get_peft_model(factory(case)(), config(lib, case, **extra))
    return models.perturb(model, seed, 0.1).eval()


def inputs(case):
    return MODELS[CASES[case][0]][1]()


def base_out(case):
    return models.forward(factory(case)(), inputs(case))


def pair(case):
    return copy_hf_into_fastpeft(lambda: build(peft, case), factory(case), config(fastpeft, case))


# ---------------------------------------------------------------------------------------------- files, both ways
@pytest.mark.parametrize("case", list(CASES))
def test_hf_adapter_loads_in_fastpeft(case, tmp_path):
    hf = build(peft, case)
    hf_out = models.forward(hf, inputs(case))
    differs(hf_out, base_out(case))
    hf.save_pretrained(str(tmp_path))
    fp = fastpeft.PeftModel.from_pretrained(factory(case)(), str(tmp_path)).eval()
    close(models.forward(fp, inputs(case)), hf_out, "fastpeft(HF adapter) vs HF PEFT")


@pytest.mark.parametrize("case", list(CASES))
def test_fastpeft_adapter_loads_in_hf(case, tmp_path):
    fp = build(fastpeft, case)
    fp_out = models.forward(fp, inputs(case))
    differs(fp_out, base_out(case))
    fp.save_pretrained(str(tmp_path))
    hf = peft.PeftModel.from_pretrained(factory(case)(), str(tmp_path)).eval()
    close(models.forward(hf, inputs(case)), fp_out, "HF PEFT(fastpeft adapter) vs fastpeft")


@pytest.mark.parametrize("case", ["mlp", "mlp_blocknum_bias", "conv2d", "bert", "butterfly3"])
def test_saved_files_config_and_init_match_hf(case, tmp_path):
    fp_model = fastpeft.get_peft_model(factory(case)(), config(fastpeft, case)).eval()
    hf_model = peft.get_peft_model(factory(case)(), config(peft, case)).eval()
    close(models.forward(fp_model, inputs(case)), base_out(case), "identity at init")
    close(models.forward(fp_model, inputs(case)), models.forward(hf_model, inputs(case)), "at init")
    fp_model.save_pretrained(str(tmp_path / "fp"))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    compare_saved_files(tmp_path, values=True)
    compare_saved_configs(tmp_path)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("case", ["mlp", "mlp_dropout", "mlp_blocknum_bias", "conv2d", "llama", "butterfly3"])
def test_training_step_gradients_match_hf(case):
    """Same gradients; with boft_dropout the same blocks are dropped (same random draws in the same order)."""
    hf, fp = pair(case)
    got = training_grads([(hf, peft), (fp, fastpeft)], inputs(case))
    assert set(got[fastpeft]) == set(got[peft])
    for k in got[peft]:
        close(got[fastpeft][k], got[peft][k], f"grad {k}")
    assert max(g.abs().max().item() for g in got[fastpeft].values()) > 1e-5
    close_states(fp, hf)


def test_block_dropout_changes_training_outputs_only():
    fp = build(fastpeft, "mlp_dropout")
    x = inputs("mlp_dropout")
    eval_out = models.forward(fp, x)
    fp.train()
    torch.manual_seed(0)
    differs(models.forward(fp, x), eval_out)
    fp.eval()
    close(models.forward(fp, x), eval_out, "eval is deterministic")


def test_bias_boft_only_trains_adapted_biases():
    for lib in (fastpeft, peft):
        model = build(lib, "mlp_blocknum_bias")
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias"))
        assert trainable == [f"base_model.model.{m}.base_layer.bias" for m in ("head", "lin0", "lin1")], lib


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("case", ["mlp", "mlp_blocknum_bias", "conv2d", "llama", "butterfly2"])
def test_merge_unmerge_and_unload_match_hf(case):
    hf, fp = pair(case)
    x = inputs(case)
    expected = models.forward(fp, x)
    weights = {n: p.detach().clone() for n, p in fp.named_parameters() if "base_layer" in n}
    fp.base_model.merge_adapter(safe_merge=True)
    close(models.forward(fp, x), expected, "merged")
    assert any((weights[n] - p).abs().max() > 1e-4 for n, p in fp.named_parameters() if n in weights)
    fp.base_model.unmerge_adapter()
    close(models.forward(fp, x), expected, "unmerged")
    for n, p in fp.named_parameters():
        if n in weights:
            close(p, weights[n], f"restored {n}")
    with fp.disable_adapter(), hf.disable_adapter():
        close(models.forward(fp, x), models.forward(hf, x), "disabled")
    merged = fp.merge_and_unload()
    hf_w = dict(hf.merge_and_unload().named_parameters())
    for n, p in merged.named_parameters():
        close(p, hf_w[n], f"merged weight {n}")
    close(models.forward(merged, x), expected, "merge_and_unload")


# ---------------------------------------------------------------------------------------------- several adapters
def two_adapters(lib):
    model = build(lib, "mlp")
    model.add_adapter("other", config(lib, "mlp", target_modules=["lin1", "head"], boft_block_size=4))
    models.perturb(model, 5, 0.1, wanted=lambda n: ".other" in n)
    return model


def test_two_adapters_active_merge_and_switching_match_hf():
    hf, fp = two_adapters(peft), two_adapters(fastpeft)
    fastpeft.set_peft_model_state_dict(fp, peft.get_peft_model_state_dict(hf, adapter_name="other"), "other")
    fastpeft.set_peft_model_state_dict(fp, peft.get_peft_model_state_dict(hf))
    x = models.mlp_inputs()
    for active in (["default", "other"], "other", "default"):
        hf.base_model.set_adapter(active)
        fp.base_model.set_adapter(active)
        close(models.forward(fp, x), models.forward(hf, x), f"active={active}")
    hf.base_model.set_adapter(["default", "other"])
    fp.base_model.set_adapter(["default", "other"])
    expected = models.forward(fp, x)
    for model in (hf, fp):
        model.merge_adapter(["default", "other"])
    close(models.forward(fp, x), expected, "both merged")
    close(models.forward(fp, x), models.forward(hf, x), "both merged vs HF")
    fp.unmerge_adapter()
    close(models.forward(fp, x), expected, "both unmerged")


def test_mixed_batch_rows_equal_single_adapter_runs():
    fp = two_adapters(fastpeft)
    x = models.mlp_inputs()[:3]
    names = ["other", "__base__", "default"]
    mixed = fp(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with fp.disable_adapter():
                want = fp(x[i:i + 1])
        else:
            fp.base_model.set_adapter(name)
            want = fp(x[i:i + 1])
        close(mixed[i:i + 1], want, f"row {i} ({name})")


# ---------------------------------------------------------------------------------------------- math and errors
@pytest.mark.parametrize("case", BUTTERFLY + ["mlp"])
def test_butterfly_rotation_is_orthogonal_and_equals_hf(case):
    hf, fp = pair(case)
    ours = fp.base_model.model.lin1.rotation("default")
    theirs, _ = hf.base_model.model.lin1.get_delta_weight("default")
    close(ours, theirs, "rotation")
    assert orth.orthogonality_error(ours.unsqueeze(0)) < 1e-5


def test_butterfly_permutations_equal_hf():
    layer = make_boft_layer()
    for n, blocks, chunk in [(16, 8, 1), (16, 4, 1), (32, 4, 2), (24, 6, 2)]:
        theirs = layer.block_butterfly_perm(n, blocks, chunk, 1)
        assert torch.equal(orth.butterfly_permutation(n, blocks, chunk), theirs), (n, blocks, chunk)


def make_boft_layer():
    hf = peft.get_peft_model(make_square_mlp(), peft.BOFTConfig(target_modules=["lin0"], boft_block_size=2))
    return hf.base_model.model.lin0


def test_bad_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="exactly one of boft_block_num"):
        BOFTConfig(boft_block_size=4, boft_block_num=4)
    with pytest.raises(ValueError, match="bias"):
        BOFTConfig(bias="oft_only")
    with pytest.raises(ValueError, match="boft_n_butterfly_factor"):
        BOFTConfig(boft_n_butterfly_factor=0)
    with pytest.raises(ValueError, match="divisible by boft_block_size"):
        fastpeft.get_peft_model(models.make_mlp(), BOFTConfig(target_modules=["lin0"], boft_block_size=3))
    with pytest.raises(ValueError, match="must be a multiple of boft_block_size x"):
        fastpeft.get_peft_model(models.make_mlp(), BOFTConfig(target_modules=["lin1"], boft_block_size=2,
                                                              boft_n_butterfly_factor=4))
    with pytest.raises(ValueError, match="groups=1"):
        fastpeft.get_peft_model(models.make_conv2d(), BOFTConfig(target_modules=["gconv"], boft_block_size=4))
