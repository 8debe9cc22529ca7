"""Adapter kinds: the registry, typed options, and a kind added from outside models/adapters/ as
one file (a scaled 1x1 convolution beside every FFN), trained through `abair adapters --runner
prefect` and used to restore an image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from models.adapters import (AdapterBank, AdapterOptions, get_kind, kind_names, load_kind_modules,
                             read_adapter_metadata, read_adapter_options)
from models.backbone import build_backbone
from models.checkpoint import AdapterError, save_atomic
from models.identity import restoration_state_dict
from models.restorer import Restorer

TOY_MODULE = "abair_toy_kind"
TOY_KIND = "toyconv"
TOY_SOURCE = '''"""A toy adapter kind: beside every FFN, a 1x1 convolution scaled by alpha (zero-initialised,
so a new adapter changes nothing)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.adapters import AdapterLayer, register_kind


@register_kind("toyconv", default_targets=("ffn",))
class ToyConvLayer(AdapterLayer):
    def __init__(self, base):
        super().__init__(base)
        self.channels = base.project_in.in_channels
        self.convs = nn.ParameterDict()
        self.scales = {}

    @property
    def adapter_names(self):
        return list(self.convs)

    def add_adapter(self, name, *, rank=4, alpha=4.0, hidden=8):
        reference = next(self.base_layer.parameters())
        self.convs[name] = nn.Parameter(torch.zeros(self.channels, self.channels, device=reference.device,
                                                    dtype=reference.dtype))
        self.scales[name] = alpha

    def remove_adapter(self, name):
        del self.convs[name], self.scales[name]
        if name in self.active_adapters:
            self.set_weights(None)

    def adapter_parameters(self, name):
        return {"conv": self.convs[name]}

    def adapter_delta(self, x):
        if self.adapter_weights is None or not self.active_adapters:
            return None
        weights = self.adapter_weights.to(x.device)
        delta = 0
        for k, name in enumerate(self.active_adapters):
            conv = F.conv2d(x, self.convs[name][:, :, None, None].to(x.dtype))
            delta = delta + weights[:, k, None, None, None].to(x.dtype) * self.scales[name] * conv
        return delta
'''


@pytest.fixture(scope="module")
def toy_kind_dir(tmp_path_factory) -> Path:
    """A folder outside the project holding the toy kind's module, on sys.path for this process."""
    folder = tmp_path_factory.mktemp("kinds")
    (folder / f"{TOY_MODULE}.py").write_text(TOY_SOURCE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield folder


def smooth_images(b=2, h=45, w=38):
    base = torch.rand(b, 3, 6, 6)
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


# -- the registry and the options ------------------------------------------------------------------


def test_built_in_kinds_register_themselves():
    assert {"lora", "adaptir"} <= set(kind_names())
    assert get_kind("lora").mergeable and not get_kind("adaptir").mergeable
    assert get_kind(get_kind("lora")) is get_kind("lora")
    with pytest.raises(ValueError, match="adapter kind must be one of .*kind_modules"):
        get_kind("nonesuch")
    with pytest.raises(AdapterError, match="adapters.kind_modules: cannot import 'no_such_module_here'"):
        load_kind_modules(["no_such_module_here"])


def test_options_are_typed_once_from_params_and_from_files(tmp_path):
    options = AdapterOptions.from_params({"kind": "lora", "rank": 8, "alpha": 2, "targets": ["attn.qkv"], "steps": 3})
    assert options == AdapterOptions(rank=8, alpha=2.0, hidden=8, targets=("attn.qkv",))
    assert isinstance(options.alpha, float) and isinstance(options.targets, tuple)
    with pytest.raises(ValueError, match="list of module names"):
        AdapterOptions(targets="attn.qkv")

    bank = AdapterBank(build_backbone("tiny"), "lora", options)
    assert bank.options == options
    bank.add("rain")
    kind, found = read_adapter_options(bank.save("rain", tmp_path / "rain.safetensors"))
    assert kind is get_kind("lora") and found == options

    # AdaptIR always sits beside the FFNs, whatever LoRA targets params name
    adaptir = AdapterBank(build_backbone("tiny"), "adaptir", options)
    assert adaptir.options.targets == ("ffn",) and all(name.endswith(".ffn") for name in adaptir.layers)


# -- a kind from outside the package ---------------------------------------------------------------


def test_a_kind_defined_outside_the_package_works_everywhere(toy_kind_dir, tmp_path):
    assert TOY_KIND in load_kind_modules([TOY_MODULE])
    assert not get_kind(TOY_KIND).mergeable
    torch.manual_seed(0)
    model = build_backbone("tiny").eval()
    bank = AdapterBank(model, TOY_KIND)
    assert bank.options.targets == ("ffn",) and all(name.endswith(".ffn") for name in bank.layers)
    bank.add("rain")
    bank.add("haze")
    x = smooth_images()
    with torch.no_grad():
        plain = model(x)
        with bank.weights(torch.tensor([0.5, 0.5])):
            assert torch.equal(model(x), plain)                    # zero-initialised
        for name in bank.names:
            for p in bank.parameters_of(name):
                p.normal_(0, 0.05)
    with pytest.raises(NotImplementedError):
        bank.merge("rain")

    restorer = Restorer(model, bank)
    weights = torch.tensor([[0.3, 0.7], [1.0, 0.0]])
    whole, _ = restorer.restore(x, mode="oracle", weights=weights)
    tiled, _ = restorer.restore(x, mode="oracle", weights=weights, tile=16)   # its delta runs on the whole map
    none, _ = restorer.restore(x, mode="none")
    assert (tiled - whole).abs().max() < 1e-5
    assert (whole - none).abs().max() > 1e-3

    path = bank.save("haze", tmp_path / "haze.safetensors")
    meta = read_adapter_metadata(path)
    assert meta["kind"] == TOY_KIND
    same_weights = build_backbone("tiny").eval()
    same_weights.load_state_dict({k: v.clone() for k, v in restoration_state_dict(model).items()})
    fresh = AdapterBank(same_weights, TOY_KIND)
    assert fresh.load(path) == "haze"
    with torch.no_grad(), fresh.weights(torch.tensor([1.0])), bank.weights(torch.tensor([0.0, 1.0])):
        assert torch.equal(same_weights(x), model(x))

    unknown = save_atomic(load_file(str(path)), tmp_path / "odd.safetensors", {**meta, "kind": "nosuchkind"})
    with pytest.raises(AdapterError, match="odd.safetensors: adapter kind must be one of"):
        read_adapter_options(unknown)


@pytest.mark.slow
def test_a_kind_from_params_kind_modules_trains_through_prefect_and_restores(
        toy_kind_dir, tmp_path, tiny_shards, train_params, prefect_harness, monkeypatch):
    """The kind is named only in params (adapters.kind, adapters.kind_modules): the adapter jobs
    are subprocesses that import it themselves; the restored image then differs from the backbone's."""
    from flows.cli import main
    from tasks.core.components import load_system
    from tasks.train.pretrain import pretrain

    backbone = tmp_path / "checkpoints" / "backbone.safetensors"
    pretrain({**train_params["pretrain"], "steps": 2}, shards=str(tiny_shards), out=str(backbone),
             state_path=str(tmp_path / "state.pt"), reports=str(tmp_path / "reports"), progress=False)
    adapters = {**train_params["adapters"], "kind": TOY_KIND, "kind_modules": [TOY_MODULE], "degradations": ["noise"],
                "steps": 3, "parallel": 1, "val_samples": 2}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"adapters": adapters}))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(toy_kind_dir), os.environ.get("PYTHONPATH")])))

    out = tmp_path / "checkpoints" / "adapters"
    assert main(["adapters", "--runner", "prefect", "--params", str(params), "--backbone", str(backbone),
                 "--shards", str(tiny_shards), "--out-dir", str(out), "--reports", str(tmp_path / "reports")]) == 0
    meta = read_adapter_metadata(out / "noise.safetensors")
    assert meta["kind"] == TOY_KIND and meta["steps"] == "3"

    load_kind_modules([TOY_MODULE])      # this process learns the kind the way the job did
    restorer = load_system(backbone, out)
    assert restorer.bank.kind is get_kind(TOY_KIND) and restorer.bank.names == ["noise"]
    x = smooth_images(1, 40, 40)
    restored, _ = restorer.restore(x, mode="oracle", weights=torch.tensor([[1.0]]))
    backbone_alone, _ = restorer.restore(x, mode="none")
    assert (restored - backbone_alone).abs().max() > 1e-5
