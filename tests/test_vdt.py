"""2D->3D pre-training (transfer3d.vdt): image reading, sources, a tiny VDT run end to end, I3D and ACS."""
import sys
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from transfer3d.core import DataError, ParamsError
from transfer3d.models.nets import build_backbone, classification_model
from transfer3d.models.weights import load_pretrained, load_weights
from transfer3d.vdt import (ACSConv3d, ImageFolder, ImageTransform, ResNet2d, ShapeImages, VDTParams, acs_split,
                            convert_acs, inflate_network, inflate_state_dict, read_image, render_shape,
                            run_vdt_pretrain, SHAPES)

from conftest import ROOT

torch.set_num_threads(2)
SMALL = {"widen_factor": 0.25}


def _png(path, colour, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), colour, np.uint8)).save(path)


def _folder(root, n=3):
    for k in range(n):
        _png(root / "dog" / f"d{k}.png", (200, 50, 50))
        _png(root / "cat" / f"c{k}.jpg", (50, 50, 200))
    return root


def test_imagefolder_classes_items(tmp_path):
    ds = ImageFolder(_folder(tmp_path / "f"), ImageTransform(16))
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    item = ds[len(ds) - 1]
    assert item["image"].shape == (3, 16, 16) and int(item["label"]) == 1
    assert ds.verify() == []


def test_imagefolder_corrupt_image_names_file(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    ds = ImageFolder(root, ImageTransform(16))
    i = [p.name for p, _ in ds.samples].index("broken.png")
    with pytest.raises(DataError, match="broken.png"):
        ds[i]
    bad = ds.verify()
    assert len(bad) == 1 and bad[0].path.endswith("broken.png")
    with pytest.raises(DataError, match="broken.png"):
        read_image(root / "cat" / "broken.png")


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(tmp_path / "empty")
    _png(tmp_path / "one" / "a" / "x.png", (1, 2, 3))
    (tmp_path / "one" / "b").mkdir()
    with pytest.raises(DataError, match="no images") as e:
        ImageFolder(tmp_path / "one")
    assert e.value.path.endswith("b")


def test_transform_seeded_and_shapes():
    img = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    t = ImageTransform(16, train=True)
    a, b = t(img, np.random.default_rng(1)), t(img, np.random.default_rng(1))
    assert torch.equal(a, b) and a.shape == (3, 16, 16)
    assert ImageTransform(16, train=False)(img).shape == (3, 16, 16)
    with pytest.raises(ParamsError, match="scale"):
        ImageTransform(16, scale=(0.5, 2.0))


def test_shape_images_deterministic_and_balanced():
    a, b = ShapeImages(8, num_classes=4, size=32, seed=3), ShapeImages(8, num_classes=4, size=32, seed=3)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(8))
    assert [int(a[i]["label"]) for i in range(8)] == [0, 1, 2, 3] * 2
    assert not torch.equal(a[0]["image"], ShapeImages(8, seed=3, split=1)[0]["image"])
    for k in SHAPES:
        img = render_shape(k, 24, np.random.default_rng(0))
        assert img.shape == (24, 24, 3) and img.dtype == np.uint8
    with pytest.raises(ParamsError):
        render_shape("hexagon", 24, np.random.default_rng(0))


def test_tiny_vdt_run_and_transfer(tmp_path):
    res = run_vdt_pretrain(out_dir=str(tmp_path / "run"), steps=2, batch_size=4, n_train=16, n_val=8, image_size=32,
                           backbone_kwargs=SMALL, log_every=1, progress=False, num_threads=2,
                           trainer={"tensorboard": False})
    assert set(res) >= {"out_dir", "checkpoint", "metrics", "seconds"}
    assert res["metrics"]["steps"] == 2 and res["metrics"]["chance"] == 0.25
    assert 0 <= res["metrics"]["val_accuracy"] <= 1
    for f in ("pretrained.pt", "metrics.json", "params.yaml", "train_log.jsonl"):
        assert (tmp_path / "run" / f).is_file(), f
    net = load_pretrained(res["checkpoint"])
    assert net.load_report.encoder_coverage == 1.0
    assert net.t3d_meta["classes"] == ["disk", "stripes", "cross", "checker"]
    net.eval()
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    # the encoder transfers to 3D classifiers (VDT ResNet, and MONAI's ResNet-18 with 1x1 shortcuts)
    for name, kw in [("vdt_resnet18", {}), ("resnet18", {"shortcut_type": "B"})]:
        clf = classification_model(name, 2, **SMALL, **kw)
        rep = load_weights(clf, res["checkpoint"])
        assert rep.encoder_coverage == 1.0 and set(rep.unexpected) <= {"fc.weight", "fc.bias"}, (name, rep)
        assert clf.eval()(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2)


def test_vdt_run_from_mapping_and_imagefolder(tmp_path):
    root = tmp_path / "imgs"
    _folder(root / "train", n=4)
    _folder(root / "val", n=1)
    raw = {"mode": "vdt", "source": "imagefolder", "data_root": str(root), "image_size": 16, "steps": 1,
           "batch_size": 2, "backbone_kwargs": SMALL, "progress": False, "out_dir": str(tmp_path / "run")}
    res = run_vdt_pretrain(raw, ["num_threads=2"])
    assert res["metrics"]["n_train"] == 8 and res["metrics"]["n_val"] == 2
    assert load_pretrained(res["checkpoint"]).t3d_meta["classes"] == ["cat", "dog"]


def test_vdt_params_errors():
    with pytest.raises(ParamsError, match="stepz"):
        VDTParams.load(overrides=["stepz=3"])
    with pytest.raises(ParamsError, match="mode"):
        VDTParams.load(mode="ssl")
    with pytest.raises(ParamsError, match="data_root"):
        run_vdt_pretrain(source="imagefolder", steps=1)


def test_quick_params_file_is_valid():
    p = VDTParams.load(ROOT / "params" / "pretrain_vdt_quick.yaml")
    assert p.mode == "vdt" and p.source == "shapes"


def _random_bn(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m


def test_i3d_reproduces_2d_on_depth_constant_volume():
    torch.manual_seed(0)
    net2d = _random_bn(ResNet2d(num_classes=3, widen_factor=0.25)).eval()
    net3d = inflate_network(net2d).eval()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y2, y3 = net2d(img), net3d(img.unsqueeze(2).repeat(1, 1, 5, 1, 1))
    assert torch.allclose(y2, y3, atol=1e-4), float((y2 - y3).abs().max())
    assert net3d.layer2[0].conv1.weight.shape == (32, 16, 3, 3, 3)
    torch.testing.assert_close(net3d.layer2[0].conv1.weight.sum(2), net2d.layer2[0].conv1.weight)


def test_inflate_state_dict_into_monai_resnet():
    net2d = ResNet2d(num_classes=3, widen_factor=0.25)
    target = build_backbone("resnet18", 1, 2, shortcut_type="B", bias_downsample=False, widen_factor=0.25)
    sd, rep = inflate_state_dict(net2d.state_dict(), target)
    assert rep["summed_input"] == ["conv1.weight"] and rep["skipped"] == ["fc.weight", "fc.bias"]
    assert load_weights(target, sd, format="generic").encoder_coverage == 1.0
    torch.testing.assert_close(sd["conv1.weight"].sum(2), net2d.conv1.weight.sum(1, keepdim=True))


def test_acs_conv_split_and_groups():
    assert acs_split(64) == (22, 21, 21) and acs_split(5) == (2, 2, 1) and sum(acs_split(7)) == 7
    torch.manual_seed(0)
    c2 = nn.Conv2d(3, 7, 3, padding=1)
    acs = ACSConv3d.from_conv2d(c2)
    assert acs.split == (3, 2, 2)
    x = torch.randn(1, 3, 5, 6, 7)
    y = acs(x)
    assert y.shape == (1, 7, 5, 6, 7)
    w, b = c2.weight, c2.bias
    torch.testing.assert_close(y[:, :3], F.conv3d(x, w[:3, ..., None], b[:3], padding=(1, 1, 0)))
    torch.testing.assert_close(y[:, 3:5], F.conv3d(x, w[3:5, :, :, None, :], b[3:5], padding=(1, 0, 1)))
    torch.testing.assert_close(y[:, 5:], F.conv3d(x, w[5:, :, None], b[5:], padding=(0, 1, 1)))
    assert ACSConv3d(3, 6, 3, stride=2, padding=1)(x).shape == (1, 6, 3, 3, 4)
    with pytest.raises(ParamsError, match="kernel_size"):
        ACSConv3d(3, 6, (3, 5))


def test_convert_acs_keeps_2d_weights():
    net2d = ResNet2d(num_classes=4, widen_factor=0.25)
    acs = convert_acs(net2d).eval()
    sd2, sda = net2d.state_dict(), acs.state_dict()
    assert list(sd2) == list(sda) and all(torch.equal(sd2[k], sda[k]) for k in sd2)
    assert isinstance(acs.layer3[0].conv2, ACSConv3d)
    with torch.no_grad():
        assert acs(torch.randn(2, 3, 16, 16, 16)).shape == (2, 4)


def test_pretrain_cli_dispatches_vdt(tmp_path):
    cmd = [sys.executable, "-m", "transfer3d", "pretrain", "-f", str(ROOT / "params" / "pretrain_vdt_quick.yaml"),
           "-p", "steps=1", "-p", "batch_size=2", "-p", "n_train=4", "-p", "n_val=2", "-p", "progress=false",
           "-p", "num_threads=1", "-p", f"out_dir={tmp_path / 'cli'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "cli" / "pretrained.pt").is_file()
