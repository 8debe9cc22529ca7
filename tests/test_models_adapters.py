"""LoRA and AdaptIR adapter banks: zero init, mixing, merging, freezing, files and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.adapters import AdapterBank, read_adapter_metadata
from models.adapters.adaptir import AdaptIRAdapter, stacked_adapters
from models.adapters.lora import LoRALayer
from models.backbone import build_backbone
from models.checkpoint import AdapterError, save_atomic
from models.identity import fingerprint

KINDS = ["lora", "adaptir"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomise(bank: AdapterBank, name: str, std: float = 0.05) -> None:
    """Stand-in for training: give an adapter non-zero weights so it changes the output."""
    with torch.no_grad():
        for p in bank.parameters_of(name):
            p.add_(torch.randn_like(p) * std)


def make(kind: str, names=("rain", "haze"), size: str = "tiny", trained: bool = True):
    torch.manual_seed(3)
    model = build_backbone(size).eval()
    bank = AdapterBank(model, kind=kind, rank=4, alpha=4.0, hidden=8)
    for name in names:
        bank.add(name)
        if trained:
            randomise(bank, name)
    return model, bank


# -- LoRA layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [nn.Conv2d(6, 10, 1), nn.Linear(6, 10)])
def test_lora_layer_weighted_sum_is_linear_and_merge_is_exact(base):
    layer = LoRALayer(base)
    layer.add_adapter("a", rank=4, alpha=8.0)
    layer.add_adapter("b", rank=2, alpha=2.0)                   # different ranks on one layer
    x = torch.randn(3, 6, 5, 7) if isinstance(base, nn.Conv2d) else torch.randn(3, 9, 6)
    with torch.no_grad():
        plain = base(x)
        assert torch.equal(layer(x), plain)                     # no weights set: the base layer
        layer.set_weights(torch.ones(3, 2))
        assert torch.equal(layer(x), plain)                     # B = 0: a new adapter changes nothing
        for name in ("a", "b"):
            layer.lora_B[name].normal_()

        def run(w):
            layer.set_weights(torch.tensor(w).expand(3, -1))
            return layer(x)

        delta_a, delta_b = run([1.0, 0.0]) - plain, run([0.0, 1.0]) - plain
        torch.testing.assert_close(run([0.3, 0.7]) - plain, 0.3 * delta_a + 0.7 * delta_b, atol=1e-5, rtol=1e-5)
        # matches the definition W x + alpha/r * B A x
        ref = plain + 2.0 * (layer.lora_B["a"] @ layer.lora_A["a"] @ x.movedim(1 if x.dim() == 4 else -1, -1)
                             .unsqueeze(-1)).squeeze(-1).movedim(-1, 1 if x.dim() == 4 else -1)
        torch.testing.assert_close(run([1.0, 0.0]), ref, atol=1e-5, rtol=1e-5)
        per_sample = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
        layer.set_weights(per_sample)
        mixed = layer(x)
        torch.testing.assert_close(mixed[1], (plain + delta_b)[1], atol=1e-5, rtol=1e-5)

        original = base.weight.data
        snapshot = original.clone()
        layer.merge("a")
        assert layer(x).shape == plain.shape
        torch.testing.assert_close(layer(x), plain + delta_a, atol=1e-5, rtol=1e-5)  # weights ignored while merged
        layer.unmerge()
        assert base.weight.data_ptr() == original.data_ptr() and torch.equal(base.weight, snapshot)


def test_lora_layer_rejects_non_pointwise_conv():
    with pytest.raises(TypeError):
        LoRALayer(nn.Conv2d(4, 4, 3))


# -- banks on the backbone ---------------------------------------------------------------------


@pytest.mark.parametrize("size", ["tiny", "base", "large"])
def test_bank_forward_odd_size_both_kinds(size):
    torch.manual_seed(3)
    model = build_backbone(size).eval()
    x = torch.rand(1, 3, 37, 53)
    fp = fingerprint(model)
    for kind in KINDS:
        bank = AdapterBank(model, kind=kind)
        bank.add("rain")
        bank.add("haze")
        with torch.no_grad(), bank.weights(torch.tensor([[0.5, 0.5]])):
            assert model(x).shape == x.shape
        assert bank.unload() is model
        assert not any(getattr(m, "wraps_base_layer", False) for m in model.modules())
    assert fingerprint(model) == fp


@pytest.mark.parametrize("kind", KINDS)
def test_zero_initialised_adapters_change_nothing(kind):
    model, bank = make(kind, trained=False)
    x = torch.rand(2, 3, 37, 53)
    with torch.no_grad():
        plain = model(x)
        with bank.weights(torch.tensor([[0.3, 0.7], [1.0, 0.0]])):
            assert torch.equal(model(x), plain)


@pytest.mark.parametrize("kind", KINDS)
def test_one_hot_equals_single_adapter_alone(kind):
    model, bank = make(kind, names=("rain", "haze", "noise"))
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        with bank.weights(torch.tensor([0.0, 1.0, 0.0])):
            one_hot = model(x)
        # the same backbone with only that adapter
        for name in ("rain", "noise"):
            bank.remove(name)
        with bank.weights(torch.tensor([1.0])):
            alone = model(x)
        plain = model(x)
    assert torch.equal(one_hot, alone)
    assert not torch.equal(one_hot, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_weights_are_per_sample(kind):
    model, bank = make(kind)
    x = torch.rand(1, 3, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad(), bank.weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]])):
        both = model(x)
    with torch.no_grad(), bank.weights(torch.tensor([[0.0, 1.0]])):
        second = model(x[:1])
    assert (both[1] - second[0]).abs().max() < 1e-5
    assert (both[0] - both[1]).abs().max() > 1e-4


def test_lora_merge_equals_bank_one_hot_and_unmerge_is_bit_exact():
    model, bank = make("lora", names=("rain", "haze", "noise"))
    x = torch.rand(2, 3, 37, 53)
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in bank.layers.items()}
    with torch.no_grad():
        with bank.weights(torch.tensor([0.0, 0.0, 1.0])):
            banked = model(x)
        bank.merge("noise")
        assert bank.merged == "noise"
        merged = model(x)
        with bank.weights(torch.tensor([1.0, 0.0, 0.0])):    # ignored while merged
            assert torch.equal(model(x), merged)
        bank.unmerge()
    assert (merged - banked).abs().max() < 1e-5
    for name, layer in bank.layers.items():
        assert torch.equal(layer.base_layer.weight, originals[name])
    assert bank.merged is None


def test_lora_merge_mix_equals_shared_soft_weights():
    model, bank = make("lora", names=("rain", "haze", "noise"))
    x = torch.rand(2, 3, 33, 41)
    w = torch.tensor([0.2, 0.5, 0.3])
    original = {name: layer.base_layer.weight.detach().clone() for name, layer in bank.layers.items()}
    with torch.no_grad():
        with bank.weights(w):
            soft = model(x)
        bank.merge_mix(w)
        merged = model(x)
        bank.unmerge()
    assert (merged - soft).abs().max() < 1e-5
    assert all(torch.equal(layer.base_layer.weight, original[name]) for name, layer in bank.layers.items())


def test_adaptir_cannot_merge():
    _, bank = make("adaptir")
    with pytest.raises(NotImplementedError):
        bank.merge("rain")


def test_lora_bank_is_linear_in_the_weights_at_a_layer():
    model, bank = make("lora")
    name, layer = next(iter(bank.layers.items()))
    x = torch.randn(1, layer.in_features, 9, 11)
    with torch.no_grad():
        plain = layer(x)
        deltas = []
        for w in ([1.0, 0.0], [0.0, 1.0]):
            bank.set_weights(torch.tensor(w))
            deltas.append(layer(x) - plain)
        bank.set_weights(torch.tensor([0.3, 0.7]))
        blend = layer(x) - plain
        bank.set_weights(None)
    torch.testing.assert_close(blend, 0.3 * deltas[0] + 0.7 * deltas[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_backbone_gradients_reach_only_the_adapter(kind):
    model, bank = make(kind)
    bank.freeze_backbone(trainable=["haze"])
    model.train()
    x = torch.rand(2, 3, 32, 32)
    with bank.weights(torch.tensor([0.0, 1.0])):
        loss = (model(x) - x).abs().mean()
    loss.backward()
    haze = {id(p) for p in bank.parameters_of("haze")}
    for name, p in model.named_parameters():
        if id(p) in haze:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.parameters_of("haze"))


def test_parameters_of_is_only_that_adapter():
    _, bank = make("lora", names=("rain", "haze"))
    rain, haze = bank.parameters_of("rain"), bank.parameters_of("haze")
    assert not {id(p) for p in rain} & {id(p) for p in haze}
    assert len(rain) == 2 * len(bank.layers)
    assert bank.num_parameters() == bank.num_parameters("rain") + bank.num_parameters("haze")
    assert set(bank.state_dict_of("rain")) == {k for k, _ in bank.named_parameters_of("rain")}
    assert all("rain" not in k for k in bank.state_dict_of("rain"))


def test_adaptir_frequency_branch_identity_and_odd_sizes():
    adapter = AdaptIRAdapter(dim=12, hidden=6, rank=3)
    for h, w in ((7, 9), (8, 8), (5, 12)):
        x = torch.randn(2, 6, h, w)
        torch.testing.assert_close(adapter.frequency(x), x, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 12, 7, 9)
    assert torch.equal(adapter(x), torch.zeros_like(x))          # zero-initialised output projection


def test_adaptir_stacked_path_equals_one_call_per_adapter():
    adapters = [AdaptIRAdapter(dim=12, hidden=8, rank=4) for _ in range(3)]
    with torch.no_grad():
        for adapter in adapters:
            for p in adapter.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(2, 12, 9, 13)
    weights = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    with torch.no_grad():
        reference = sum(weights[:, k, None, None, None] * a(x) for k, a in enumerate(adapters))
        stacked = stacked_adapters(x, adapters, weights)
        stacked_cl = stacked_adapters(x.to(memory_format=torch.channels_last), adapters, weights)
    assert reference.abs().mean() > 1e-2
    torch.testing.assert_close(stacked, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stacked_cl, reference, atol=1e-5, rtol=1e-5)


def test_bank_argument_errors():
    model, bank = make("lora")
    with pytest.raises(ValueError, match="already carries"):
        AdapterBank(model)
    with pytest.raises(ValueError, match="already has"):
        bank.add("rain")
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        bank.set_weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="no layer"):
        AdapterBank(build_backbone("tiny"), targets=("nothing.here",))


# -- files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_file_round_trip(kind, tmp_path):
    model, bank = make(kind)
    path = bank.save("haze", tmp_path / "haze.safetensors", extra_metadata={"psnr": 30.5})
    meta = read_adapter_metadata(path)
    assert meta["degradation"] == "haze" and meta["kind"] == kind and meta["rank"] == "4"
    assert meta["backbone_fingerprint"] == fingerprint(model)
    assert int(meta["parameters"]) == bank.num_parameters("haze")

    x = torch.rand(2, 3, 37, 53)
    with torch.no_grad(), bank.weights(torch.tensor([0.0, 1.0])):
        expected = model(x)

    # a fresh bank on a fresh backbone holding the same weights
    fresh_model = build_backbone("tiny").eval()
    fresh_model.load_state_dict(_plain_state(model))
    fresh = AdapterBank(fresh_model, kind=kind)
    assert fresh.load(path) == "haze"
    with torch.no_grad(), fresh.weights(torch.tensor([1.0])):
        assert torch.equal(fresh_model(x), expected)
    assert fresh.load(path, name="haze2") == "haze2" and fresh.names == ["haze", "haze2"]


def test_adapter_on_another_backbone_is_an_error(tmp_path):
    _, bank = make("lora")
    path = bank.save("rain", tmp_path / "rain.safetensors")
    other = AdapterBank(build_backbone("tiny"), kind="lora")    # different random weights
    with pytest.raises(AdapterError, match=r"rain\.safetensors: trained on backbone [0-9a-f]{16}"):
        other.load(path)
    assert other.names == []


def test_adapter_kind_rank_and_tensor_mismatches(tmp_path):
    model, bank = make("lora", names=("rain",))
    path = bank.save("rain", tmp_path / "rain.safetensors")
    bank.remove("rain")

    targets = ("attn.qkv", "attn.project_out", "ffn.project_in", "ffn.project_out")
    for change, message in (({"kind": "adaptir"}, "kind"), ({"rank": 8}, "rank"),
                            ({"targets": ("attn.qkv",)}, "targets")):
        same_weights = build_backbone("tiny")
        same_weights.load_state_dict(_plain_state(model))
        other = AdapterBank(same_weights, **{"kind": "lora", "rank": 4, "targets": targets, **change})
        with pytest.raises(AdapterError, match=f"rain.safetensors: {message}"):
            other.load(path)

    # missing and extra tensors
    bank_state = _file_tensors(path)
    tensors = dict(bank_state)
    meta = read_adapter_metadata(path)
    dropped = sorted(bank_state)[0]
    del tensors[dropped]
    tensors["encoder_level1.0.attn.qkv.lora_C"] = torch.zeros(1)
    broken = save_atomic(tensors, tmp_path / "broken.safetensors", meta)
    with pytest.raises(AdapterError, match=r"broken.safetensors: missing tensors .*lora_.*; unexpected tensors "
                                           r"encoder_level1\.0\.attn\.qkv\.lora_C"):
        bank.load(broken)
    assert bank.names == []

    misshapen = dict(bank_state)
    misshapen[dropped] = torch.zeros(3, 3)
    bad = save_atomic(misshapen, tmp_path / "bad.safetensors", meta)
    with pytest.raises(AdapterError, match="bad.safetensors: tensors with the wrong shape"):
        bank.load(bad)

    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(AdapterError, match="junk.safetensors: unreadable"):
        bank.load(junk)
    with pytest.raises(AdapterError, match="nope.safetensors: file not found"):
        bank.load(tmp_path / "nope.safetensors")
    assert bank.load(path) == "rain"


def _plain_state(model):
    from models.identity import restoration_state_dict
    return {k: v.detach().clone() for k, v in restoration_state_dict(model).items()}


def _file_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_checkpoint_bytes_depend_only_on_tensors_and_metadata(tmp_path):
    """safetensors emits its header in hash-map order; registration dedups by file sha256, so the
    same adapter saved twice must be the same bytes."""
    from safetensors import safe_open

    model = build_backbone("tiny")
    bank = AdapterBank(model, kind="lora")
    bank.add("rain")
    saved = {bank.save("rain", tmp_path / f"rain{i}.safetensors").read_bytes() for i in range(6)}
    assert len(saved) == 1
    with safe_open(str(tmp_path / "rain0.safetensors"), "pt") as f:
        assert read_adapter_metadata(tmp_path / "rain0.safetensors")["degradation"] == "rain"
        assert len(list(f.keys())) == len(bank.parameters_of("rain"))
