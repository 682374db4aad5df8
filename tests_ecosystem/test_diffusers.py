"""diffusers' LoRA API on fastpeft as `peft`, HF PEFT not installed: tiny UNet2DConditionModel, SD3 and Flux
transformers and a tiny StableDiffusionPipeline.

Served and checked: add_adapter, load_lora_adapter / the pipeline's load_lora_weights of state dicts (LoRA,
with per-module ranks, and LoKr), set_adapters weights, the forward's lora scale (scale_layer / unscale_layer
/ set_scale), fuse_lora / unfuse_lora (merge(safe_merge=, adapter_names=), unmerge, merged_adapters),
disable_lora / enable_lora, delete_adapters, unload_lora(_weights), enable_lora_hotswap + hot swaps
(peft.utils.hotswap) and layerwise casting (peft.helpers.disable_input_dtype_casting, adapter_layer_names).

Expected outputs are computed independently: a copy of the base model whose targeted weights get
W + sum_i w_i * s_i * B_i @ A_i (LoKr: torch.kron of its factors), run as a plain model. The per-layer calls
are compared with HF PEFT's in tests/integrations/test_diffusers.py.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import pytest
import torch
import transformers
from diffusers.hooks import apply_layerwise_casting

import fastpeft

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- tiny models
def _unet():
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        sample_size=8, norm_num_groups=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16)


def _flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8))


def _unet_inputs(g):
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 700]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}


def _sd3_inputs(g):
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 700]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "pooled_projections": torch.randn(2, 16, generator=g)}


def _flux_inputs(g):
    return {"hidden_states": torch.randn(2, 16, 4, generator=g), "timestep": torch.tensor([0.3, 0.7]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "pooled_projections": torch.randn(2, 16, generator=g),
            "img_ids": torch.randint(0, 4, (16, 3), generator=g).float(), "txt_ids": torch.zeros(5, 3)}


@dataclass(frozen=True)
class Kind:
    build: Callable
    inputs: Callable
    # the forward argument whose {"scale": s} diffusers turns into scale_layer / unscale_layer
    scale_kwarg: str


KINDS = {"unet": Kind(_unet, _unet_inputs, "cross_attention_kwargs"),
         "sd3": Kind(_sd3, _sd3_inputs, "joint_attention_kwargs"),
         "flux": Kind(_flux, _flux_inputs, "joint_attention_kwargs")}
_BASES: dict[str, torch.nn.Module] = {}


def base(kind: str) -> torch.nn.Module:
    """A fresh copy of the (seeded, cached) tiny base model `kind`."""
    if kind not in _BASES:
        torch.manual_seed(0)
        _BASES[kind] = KINDS[kind].build().eval()
    return copy.deepcopy(_BASES[kind])


def run(model, kind: str, scale: float | None = None) -> torch.Tensor:
    kwargs = KINDS[kind].inputs(torch.Generator().manual_seed(1))
    if scale is not None:
        kwargs[KINDS[kind].scale_kwarg] = {"scale": scale}
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


def close(got, want, what, atol=2e-5):
    torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------- by hand
def targets(model, suffixes=ATTN) -> list[str]:
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.endswith(tuple(f".{s}" for s in suffixes)))


def lora_state_dict(model, names, seed: int, rank: int = 4, ranks: dict | None = None) -> dict:
    """PEFT-format LoRA tensors (keys without adapter name, as diffusers passes them) for modules `names`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        w = model.get_submodule(name).weight
        r = (ranks or {}).get(name, rank)
        sd[f"{name}.lora_A.weight"] = torch.randn(r, w.shape[1], generator=g) * 0.3
        sd[f"{name}.lora_B.weight"] = torch.randn(w.shape[0], r, generator=g) * 0.3
    return sd


def lora_deltas(sd: dict, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """{module: weight * B @ A} (diffusers builds these configs with alpha = r: scale 1)."""
    names = {k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")}
    return {n: weight * sd[f"{n}.lora_B.weight"] @ sd[f"{n}.lora_A.weight"] for n in names}


def layer_deltas(model, adapter: str, scale: float, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """{module: weight * scale * B @ A} read from the adapter tensors of `model`'s LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return {n: weight * scale * (m.lora_B[adapter].weight @ m.lora_A[adapter].weight).detach()
            for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def add(*deltas: dict) -> dict:
    out: dict[str, torch.Tensor] = {}
    for d in deltas:
        for k, v in d.items():
            out[k] = out[k] + v if k in out else v
    return out


def hand_model(kind: str, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = base(kind)
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight += delta
    return model


def expected(kind: str, deltas: dict) -> torch.Tensor:
    return run(hand_model(kind, deltas), kind)


def lora_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


# ---------------------------------------------------------------------------------------------- API surface
def test_layer_api_that_diffusers_reads():
    from peft.helpers import disable_input_dtype_casting
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer, factorization
    from peft.tuners.lora.layer import LoraLayer

    assert LoraLayer.adapter_layer_names == (
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    assert LoHaLayer.adapter_layer_names == ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                             "hada_t1", "hada_t2")
    assert LoKrLayer.adapter_layer_names == (
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    assert [factorization(64, 4), factorization(48), factorization(96, 8)] == [(4, 16), (6, 8), (8, 12)]
    assert disable_input_dtype_casting is fastpeft.helpers.disable_input_dtype_casting
    for layer in (LoraLayer, LoHaLayer, LoKrLayer):
        # fuse_lora(adapter_names=) needs it
        assert "adapter_names" in inspect.signature(layer.merge).parameters


# ------------------------------------------------------------------------------------------ add / set weights
@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_add_adapter_and_set_adapters_weights(kind, tmp_path):
    model = base(kind)
    base_out = run(model, kind)
    torch.manual_seed(3)
    model.add_adapter(fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"],
                                          init_lora_weights=False), adapter_name="a")
    model.add_adapter(fastpeft.LoraConfig(r=2, lora_alpha=1, target_modules=["to_k", "to_v"],
                                          init_lora_weights=False), adapter_name="b")
    assert model.active_adapters() == "b" and sorted(model.peft_config) == ["a", "b"]
    close(run(model, kind), expected(kind, layer_deltas(model, "b", 0.5)), "after add_adapter: b alone")
    assert all(set(m.r) <= {"a", "b"} and isinstance(m.r, dict) for m in lora_layers(model))

    model.set_adapters(["a", "b"], weights=[0.5, 3.0])
    want = add(layer_deltas(model, "a", 2.0, 0.5), layer_deltas(model, "b", 0.5, 3.0))
    close(run(model, kind), expected(kind, want), "set_adapters weights [0.5, 3.0]")
    model.set_adapters(["a", "b"], weights=[0.0, 0.0])
    assert torch.equal(run(model, kind), base_out), "weights 0 must give the base output"
    model.set_adapters("a")  # weight None -> 1.0
    close(run(model, kind), expected(kind, layer_deltas(model, "a", 2.0)), "set_adapters('a')")

    # save_lora_adapter writes the config into the file's metadata; loading builds LoraConfig(**metadata) from
    # it
    model.save_lora_adapter(str(tmp_path), adapter_name="b")
    fresh = base(kind)
    fresh.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", prefix=None,
                            adapter_name="b")
    assert (fresh.peft_config["b"].r, fresh.peft_config["b"].lora_alpha) == (2, 1)
    close(run(fresh, kind), expected(kind, layer_deltas(model, "b", 0.5)), "b saved and loaded back")


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", ["unet", "sd3", "flux"])
def test_load_lora_adapter_and_forward_scale(kind):
    model = base(kind)
    base_out = run(model, kind)
    names = targets(model)
    sd = lora_state_dict(model, names, seed=1, ranks={names[0]: 2, names[-1]: 6})  # per-module ranks
    model.load_lora_adapter(dict(sd), prefix=None, adapter_name="pokemon")
    assert list(model.peft_config) == ["pokemon"] and model.active_adapters() == "pokemon"
    loaded = fastpeft.get_peft_model_state_dict(model, adapter_name="pokemon")
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())
    full = expected(kind, lora_deltas(sd))
    close(run(model, kind), full, "loaded adapter")

    # the forward's lora scale: scale_layer before, unscale_layer after (weight 0: set_scale(name, 1.0) after)
    close(run(model, kind, scale=0.25), expected(kind, lora_deltas(sd, 0.25)), "lora scale 0.25")
    close(run(model, kind), full, "after a scaled call")
    assert torch.equal(run(model, kind, scale=0.0), base_out), "lora scale 0 must give the base output"
    close(run(model, kind), full, "after a call with scale 0")


def test_load_dora_and_lora_bias_state_dicts():
    """lora_magnitude_vector keys make diffusers build use_dora=True, lora_B.bias keys lora_bias=True."""
    kind = "sd3"
    model = base(kind)
    names = targets(model)
    g = torch.Generator().manual_seed(5)
    dora, biased = lora_state_dict(model, names, seed=1), lora_state_dict(model, names, seed=2)
    for name in names:
        w = model.get_submodule(name).weight
        dora[f"{name}.lora_magnitude_vector"] = (w.norm(dim=1)
                                                 * (1 + 0.2 * torch.randn(w.shape[0], generator=g)))
        biased[f"{name}.lora_B.bias"] = torch.randn(w.shape[0], generator=g) * 0.1
    model.load_lora_adapter(dict(dora), prefix=None, adapter_name="dora")
    model.load_lora_adapter(dict(biased), prefix=None, adapter_name="biased")
    assert model.peft_config["dora"].use_dora and model.peft_config["biased"].lora_bias
    hand_dora, hand_bias = base(kind), hand_model(kind, lora_deltas(biased))
    with torch.no_grad():
        # DoRA: W' = m / ||W + B A||_row * (W + B A); lora_bias adds B's bias to the base bias
        for name in names:
            merged = hand_dora.get_submodule(name).weight + lora_deltas(dora)[name]
            hand_dora.get_submodule(name).weight.copy_((dora[f"{name}.lora_magnitude_vector"]
                                                        / merged.norm(dim=1))[:, None] * merged)
            hand_bias.get_submodule(name).bias += biased[f"{name}.lora_B.bias"]
    for adapter, hand in (("dora", hand_dora), ("biased", hand_bias)):
        model.set_adapters(adapter)
        close(run(model, kind), run(hand, kind), f"{adapter} adapter")
        model.fuse_lora()
        close(run(model, kind), run(hand, kind), f"{adapter} adapter, fused")
        model.unfuse_lora()


def test_load_lokr_state_dict():
    kind = "unet"
    model = base(kind)
    g = torch.Generator().manual_seed(2)
    sd, deltas = {}, {}
    for name in targets(model, ("to_q", "to_out.0")):
        out_f, in_f = model.get_submodule(name).weight.shape
        w1, w2 = torch.randn(4, 4, generator=g), torch.randn(out_f // 4, in_f // 4, generator=g) * 0.1
        sd[f"{name}.lokr_w1"], sd[f"{name}.lokr_w2"] = w1, w2
        deltas[name] = torch.kron(w1, w2)  # diffusers' LoKr configs use alpha = r: scale 1
    model.load_lora_adapter(dict(sd), prefix=None, adapter_name="kron")
    assert type(model.peft_config["kron"]).__name__ == "LoKrConfig"
    close(run(model, kind), expected(kind, deltas), "LoKr state dict")
    model.set_adapters(["kron"], weights=[0.5])
    close(run(model, kind), expected(kind, {k: 0.5 * v for k, v in deltas.items()}), "LoKr weight 0.5")
    model.fuse_lora()
    layer = model.get_submodule(next(iter(deltas)))
    assert layer.merged_adapters == ["kron"]
    close(layer.get_base_layer().weight, _BASES[kind].get_submodule(next(iter(deltas))).weight
          + 0.5 * next(iter(deltas.values())), "LoKr fused weight", atol=1e-6)
    model.unfuse_lora()
    close(run(model, kind), expected(kind, {k: 0.5 * v for k, v in deltas.items()}), "LoKr after unfuse")


# ---------------------------------------------------------------------------------------------- fuse / unfuse
def _two_loaded(kind):
    model = base(kind)
    names = targets(model)
    sd_a, sd_b = lora_state_dict(model, names, seed=4), lora_state_dict(model, names[::2], seed=5, rank=2)
    model.load_lora_adapter(dict(sd_a), prefix=None, adapter_name="a")
    model.load_lora_adapter(dict(sd_b), prefix=None, adapter_name="b")
    return model, sd_a, sd_b


@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_fuse_and_unfuse(kind):
    model, sd_a, sd_b = _two_loaded(kind)
    model.set_adapters(["a", "b"], weights=[1.0, 2.0])
    originals = {n: model.get_submodule(n).get_base_layer().weight.detach().clone()
                 for n in lora_deltas(sd_a)}
    model.fuse_lora(lora_scale=0.5, safe_fusing=True, adapter_names=["a"])
    for name, delta in lora_deltas(sd_a, 0.5).items():
        layer = model.get_submodule(name)
        assert layer.merged_adapters == ["a"]
        close(layer.get_base_layer().weight, originals[name] + delta, f"fused weight of {name}", atol=1e-6)
    model.unfuse_lora()
    for name, weight in originals.items():
        layer = model.get_submodule(name)
        assert layer.merged_adapters == []
        close(layer.get_base_layer().weight, weight, f"{name} after unfuse", atol=1e-6)
    # lora_scale multiplied every active adapter's scale (b's too) and stays after unfusing, as with HF PEFT
    close(run(model, kind), expected(kind, add(lora_deltas(sd_a, 0.5), lora_deltas(sd_b, 1.0))),
          "after unfuse")

    model.set_adapters(["a", "b"], weights=[1.0, 2.0])
    model.fuse_lora()  # every active adapter
    want = expected(kind, add(lora_deltas(sd_a), lora_deltas(sd_b, 2.0)))
    close(run(model, kind), want, "all adapters fused")
    assert not any(torch.equal(model.get_submodule(n).get_base_layer().weight, w)
                   for n, w in originals.items())


# ---------------------------------------------------------------------------------------------- switching
def test_disable_enable_delete_and_unload():
    kind = "sd3"
    model, sd_a, sd_b = _two_loaded(kind)
    base_out = run(base(kind), kind)
    model.set_adapters(["a", "b"])
    both = run(model, kind)
    close(both, expected(kind, add(lora_deltas(sd_a), lora_deltas(sd_b))), "both adapters")
    model.disable_lora()
    assert torch.equal(run(model, kind), base_out)
    model.enable_lora()
    close(run(model, kind), both, "enabled again", atol=0)

    model.delete_adapters("a")
    assert list(model.peft_config) == ["b"]
    assert not any("a" in m.r or "a" in m.lora_A for m in lora_layers(model))
    assert not any(".a." in n for n, _ in model.named_parameters())
    close(run(model, kind), expected(kind, lora_deltas(sd_b)), "after delete_adapters('a')")

    model.unload_lora()
    assert not lora_layers(model) and not hasattr(model, "peft_config")
    assert ({n: type(m) for n, m in model.named_modules()}
            == {n: type(m) for n, m in _BASES[kind].named_modules()})
    assert torch.equal(run(model, kind), base_out)


def test_unserved_scale_call_names_the_entry_point():
    model = base("unet")
    model.add_adapter(fastpeft.IA3Config(target_modules=["to_k", "ff.net.2"],
                                         feedforward_modules=["ff.net.2"]),
                      adapter_name="ia3")
    with pytest.raises(NotImplementedError, match="set_scale"):
        model.set_adapters(["ia3"], weights=[0.5])
    with pytest.raises(NotImplementedError, match="scale_layer"):
        model.fuse_lora(lora_scale=0.5)


# ---------------------------------------------------------------------------------------------- hot swap
def test_enable_lora_hotswap_and_swap_other_ranks():
    kind = "unet"
    model = base(kind)
    names = targets(model, ("to_q", "to_v"))
    model.enable_lora_hotswap(target_rank=8)
    first = lora_state_dict(model, names, seed=6, rank=4)
    model.load_lora_adapter(dict(first), prefix=None, adapter_name="h")
    layers = {n: model.get_submodule(n) for n in names}
    assert all(m.lora_A["h"].weight.shape[0] == 8 for m in layers.values())  # padded to target_rank
    close(run(model, kind), expected(kind, lora_deltas(first)), "first adapter, padded")
    params = {n: (m.lora_A["h"].weight, m.lora_B["h"].weight) for n, m in layers.items()}

    second = lora_state_dict(model, names, seed=7, rank=6)
    model.load_lora_adapter(dict(second), prefix=None, adapter_name="h", hotswap=True)
    close(run(model, kind), expected(kind, lora_deltas(second)), "after a hot swap to rank 6")
    for name, (a, b) in params.items():  # the same tensors (a compiled graph keeps them), values replaced
        assert layers[name].lora_A["h"].weight is a and layers[name].lora_B["h"].weight is b
    scalings = {n: m.scaling["h"] for n, m in layers.items()}
    assert all(isinstance(t, torch.Tensor) for t in scalings.values())  # prepared: 0-dim tensors
    model.set_adapters(["h"], weights=[0.5])  # set_scale writes into those tensors
    close(run(model, kind), expected(kind, lora_deltas(second, 0.5)), "weight 0.5 on the swapped adapter")
    assert all(layers[n].scaling["h"] is t for n, t in scalings.items())
    model.set_adapters(["h"], weights=[1.0])

    # covers fewer modules: the others get no update
    third = lora_state_dict(model, names[:2], seed=8, rank=8)
    model.load_lora_adapter(dict(third), prefix=None, adapter_name="h", hotswap=True)
    close(run(model, kind), expected(kind, lora_deltas(third)), "hot swap covering two modules")
    too_big = lora_state_dict(model, names, seed=9, rank=10)
    with pytest.raises(ValueError, match="target_rank"):
        model.load_lora_adapter(dict(too_big), prefix=None, adapter_name="h", hotswap=True)
    # on a failed load diffusers deletes the adapter (module.delete_adapter on every layer, peft_config entry)
    assert "h" not in model.peft_config and not any(m.has_adapter("h") for m in lora_layers(model))
    assert torch.equal(run(model, kind), run(base(kind), kind))


def test_hotswap_same_rank_without_enable():
    kind = "sd3"
    model = base(kind)
    names = targets(model)
    model.load_lora_adapter(lora_state_dict(model, names, seed=10), prefix=None, adapter_name="h")
    new = lora_state_dict(model, names, seed=11)
    model.load_lora_adapter(dict(new), prefix=None, adapter_name="h", hotswap=True)
    close(run(model, kind), expected(kind, lora_deltas(new)), "hot swap, same rank")


# ------------------------------------------------------------------------------------------ layerwise casting
def _rounded_reference(kind, model, sd):
    """An fp32 model without hooks holding `model`'s stored values (bf16 where layerwise casting stores
    them)."""
    reference = base(kind)
    reference.load_lora_adapter(dict(sd), prefix=None, adapter_name="a")
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return reference


def test_layerwise_casting_with_lora_weights_cast_too():
    """apply_layerwise_casting over every module (adapter weights included): each LoRA layer runs inside
    disable_input_dtype_casting, so its input stays fp32 while lora_A is still stored in bf16."""
    kind = "unet"
    model = base(kind)
    names = targets(model)
    sd = lora_state_dict(model, names, seed=12)
    model.load_lora_adapter(dict(sd), prefix=None, adapter_name="a")
    apply_layerwise_casting(model, storage_dtype=torch.bfloat16, compute_dtype=torch.float32,
                            skip_modules_pattern=("norm",))
    layer = model.get_submodule(names[0])
    assert layer.lora_A["a"].weight.dtype == torch.bfloat16
    reference = _rounded_reference(kind, model, sd)
    close(run(model, kind), run(reference, kind), "layerwise casting of base and adapter weights", atol=1e-5)
    assert layer.cast_input_dtype_enabled is True  # restored after each forward


def test_enable_layerwise_casting_skips_adapter_weights():
    kind = "sd3"
    model = base(kind)
    names = targets(model)
    sd = lora_state_dict(model, names, seed=13)
    model.load_lora_adapter(dict(sd), prefix=None, adapter_name="a")
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    layer = model.get_submodule(names[0])
    assert (layer.lora_A["a"].weight.dtype == torch.float32
            and layer.get_base_layer().weight.dtype == torch.bfloat16)
    close(run(model, kind), run(_rounded_reference(kind, model, sd), kind),
          "enable_layerwise_casting", atol=1e-5)


def test_disable_input_dtype_casting_contract():
    from peft.helpers import disable_input_dtype_casting

    model = base("unet")
    model.load_lora_adapter(lora_state_dict(model, targets(model), seed=14), prefix=None, adapter_name="a")
    layers = lora_layers(model)
    layers[0].cast_input_dtype_enabled = False  # a caller's own setting survives the block
    with disable_input_dtype_casting(model):
        assert all(m.cast_input_dtype_enabled is False for m in layers)
    assert layers[0].cast_input_dtype_enabled is False and all(m.cast_input_dtype_enabled for m in layers[1:])
    with disable_input_dtype_casting(model, active=False):
        assert all(m.cast_input_dtype_enabled for m in layers[1:])
    ia3 = fastpeft.inject_adapter_in_model(
        fastpeft.IA3Config(target_modules=["to_k"], feedforward_modules=[]), base("unet"))
    with pytest.raises(NotImplementedError, match="ia3"):
        with disable_input_dtype_casting(ia3):
            pass


# ---------------------------------------------------------------------------------------------- pipeline
def _pipeline():
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100,
        max_position_embeddings=16, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), latent_channels=4,
                                  norm_num_groups=8, sample_size=8)
    scheduler = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=base("unet"),
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


def _text_lora(text_encoder, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in text_encoder.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            sd[f"text_encoder.{name}.lora_A.weight"] = torch.randn(2, m.in_features, generator=g) * 0.3
            sd[f"text_encoder.{name}.lora_B.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.3
    return sd


def _latents(pipe, embeds):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_inference_steps=2, height=8, width=8,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def _encode(text_encoder, ids):
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def test_pipeline_load_lora_weights_set_fuse_unload():
    pipe = _pipeline()
    ids, embeds = torch.tensor([[0, 5, 9, 1]]), torch.randn(1, 4, 32)
    text_base, latents_base = _encode(pipe.text_encoder, ids), _latents(pipe, embeds)
    unet_sd, text_sd = (lora_state_dict(pipe.unet, targets(pipe.unet), seed=15),
                        _text_lora(pipe.text_encoder, 16))
    pipe.load_lora_weights({f"unet.{k}": v for k, v in unet_sd.items()} | text_sd, adapter_name="style")
    assert pipe.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"]}
    assert pipe.get_active_adapters() == ["style"]
    pipe.set_adapters(["style"], adapter_weights=[0.5])

    hand = _pipeline()  # the same base components, LoRA deltas added to the weights by hand
    hand.unet = hand_model("unet", lora_deltas(unet_sd, 0.5))
    with torch.no_grad():
        for name, delta in lora_deltas(text_sd, 0.5).items():
            hand.text_encoder.get_submodule(name.removeprefix("text_encoder.")).weight += delta
    text_want, want = _encode(hand.text_encoder, ids), _latents(hand, embeds)
    close(_encode(pipe.text_encoder, ids), text_want, "text encoder, weight 0.5")
    close(_latents(pipe, embeds), want, "pipeline latents, weight 0.5")

    pipe.fuse_lora(components=["unet", "text_encoder"])
    layers = lora_layers(pipe.unet) + lora_layers(pipe.text_encoder)
    assert all(m.merged_adapters == ["style"] for m in layers)
    close(_encode(pipe.text_encoder, ids), text_want, "text encoder, fused")
    close(_latents(pipe, embeds), want, "pipeline latents, fused")
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    assert not any(m.merged_adapters for m in layers)
    close(_latents(pipe, embeds), want, "pipeline latents, unfused")

    pipe.unload_lora_weights()
    assert not lora_layers(pipe.unet) and not lora_layers(pipe.text_encoder)
    # fuse + unfuse leave the base weights equal up to float rounding (W + d - d), as with HF PEFT
    close(_encode(pipe.text_encoder, ids), text_base, "text encoder after unload", atol=1e-5)
    close(_latents(pipe, embeds), latents_base, "pipeline after unload", atol=1e-5)
