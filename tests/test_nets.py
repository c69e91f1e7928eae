"""Backbones: every tensor in exactly one group, stage order, VDT shuffling determinism, task models."""

import pytest
import torch

from transfer3d.core import ParamsError
from transfer3d.models.nets import (
    BACKBONES, SMALL_KWARGS, VariableDimensionTransform, backbone_config, build_backbone, classification_model,
    encoder_stages, parameter_groups, rebuild, segmentation_model,
)

torch.set_num_threads(1)
FAST = [n for n in BACKBONES if n != "swinunetr"]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_groups_partition_the_state_dict(name):
    m = build_backbone(name, 1, 2, **SMALL_KWARGS.get(name, {}))
    groups = parameter_groups(m)
    keys = [k for ks in groups.values() for k in ks]
    assert sorted(keys) == sorted(m.state_dict())  # each key once
    stages = encoder_stages(m)
    assert len(stages) >= 4 and all(groups[f"encoder.{s}"] for s, _ in stages)
    assert groups["head"], name
    assert backbone_config(rebuild(backbone_config(m))) == backbone_config(m)


@pytest.mark.parametrize("name", FAST)
def test_task_models_forward(name):
    x = torch.randn(1, 1, 16, 16, 16)
    clf = classification_model(build_backbone(name, 1, 2, **SMALL_KWARGS.get(name, {})), 3).eval()
    with torch.no_grad():
        assert clf(x).shape == (1, 3)
        seg = segmentation_model(build_backbone(name, 1, 2, **SMALL_KWARGS.get(name, {})), 4).eval()
        assert seg(x).shape == (1, 4, 16, 16, 16)


def test_vdt_seeded_and_eval_identity():
    img = torch.randn(4, 3, 8, 8)
    a = VariableDimensionTransform(generator=3).train()(img)
    b = VariableDimensionTransform(generator=3).train()(img)
    c = VariableDimensionTransform(generator=4).train()(img)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(VariableDimensionTransform().eval()(img)[:, 0], img)
    torch.manual_seed(0)
    g1 = VariableDimensionTransform().train()(img)
    torch.manual_seed(0)
    assert torch.equal(g1, VariableDimensionTransform().train()(img))  # global RNG when no generator


def test_vdt_resnet_keeps_depth():
    m = build_backbone("vdt_resnet18", 1, 5, widen_factor=0.25).eval()
    out = {}
    m.layer4.register_forward_hook(lambda mod, i, o: out.update(shape=o.shape))  # returns None: output kept
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert out["shape"][2] == 3


def test_bad_arguments_named():
    with pytest.raises(ParamsError, match="unknown backbone"):
        build_backbone("vnet")
    with pytest.raises(ParamsError, match="out_channels"):
        build_backbone("unet3d", 1, 0)
    with pytest.raises(ParamsError, match="num_classes"):
        classification_model("unet3d", 0)
