"""Checkpoint loading: every published layout, unsafe pickles, reporting of mismatches, own checkpoints, CLI exit codes."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from transfer3d.core import WeightsError
from transfer3d.models.nets import build_backbone, encoder_stages
from transfer3d.models.weights import (
    SOURCES, CoverageError, PretrainedSource, UnsafeCheckpointError, download, export_safetensors, fabricate_checkpoint,
    load_pretrained, load_weights, read_checkpoint, save_checkpoint, unwrap_state_dict,
)

torch.set_num_threads(1)

# (format, backbone, kwargs, container keys, a published key, expected dropped head keys)
CASES = [
    ("suprem", "unet3d", {}, {"net", "optimizer", "scheduler", "epoch"}, "module.backbone.down_tr64.ops.0.conv1.weight", 13),
    ("suprem", "swinunetr", {"feature_size": 12}, {"net", "optimizer", "scheduler", "epoch"},
     "module.backbone.swinViT.patch_embed.proj.weight", 13),
    ("suprem", "segresnet", {"init_filters": 8}, {"net", "optimizer", "scheduler", "epoch"}, "module.convInit.conv.weight", 0),
    ("genesis", "unet3d", {}, {"epoch", "state_dict", "optimizer_state_dict"}, "module.down_tr512.ops.1.conv1.weight", 0),
    ("medicalnet", "resnet10", {"widen_factor": 0.25}, {"state_dict"}, "module.conv1.weight", 0),
    ("medicalnet", "resnet18", {"widen_factor": 0.25}, {"state_dict"}, "module.layer4.1.conv2.weight", 0),
    ("medicalnet", "resnet34", {"widen_factor": 0.25}, {"state_dict"}, "module.layer3.5.bn2.running_var", 0),
    ("medicalnet", "resnet50", {"widen_factor": 0.25}, {"state_dict"}, "module.layer1.0.downsample.0.weight", 0),
    ("monai-ssl", "swinunetr", {"feature_size": 12}, {"state_dict"}, "module.layers4.0.downsample.reduction.weight", 6),
]


@pytest.mark.parametrize("fmt,backbone,kwargs,container,published_key,n_dropped", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_published_layouts_load_fully(tmp_path, fmt, backbone, kwargs, container, published_key, n_dropped):
    ck = fabricate_checkpoint(fmt, backbone, in_channels=1, out_channels=1, **kwargs)
    assert set(ck) == container
    sd, _ = unwrap_state_dict(ck)
    assert published_key in sd
    path = tmp_path / "ck.pth"
    torch.save(ck, path)
    model = build_backbone(backbone, 1, 4, **kwargs)
    report = load_weights(model, path)
    assert report.format == fmt
    assert report.encoder_coverage == 1.0
    for stage, _ in encoder_stages(model):
        assert report.fraction(f"encoder.{stage}") == 1.0
    assert len(report.dropped) == n_dropped
    assert report.unexpected == []
    d = report.to_dict()
    assert d["ok"] and d["counts"]["loaded"] == len(report.loaded) and d["counts"]["dropped"] == n_dropped
    inverse = {v: k for k, v in report.renamed.items()}
    for k in report.loaded:  # the values really are the checkpoint's
        assert torch.equal(model.state_dict()[k], sd[inverse.get(k, k)])


def test_unsafe_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(tmp_path / "evil.pth")
    assert str(tmp_path / "evil.pth") in str(e.value) and "trusted=True" in str(e.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_weights(build_backbone("unet3d"), tmp_path / "evil.pth")
    assert not marker.exists()


def test_mismatch_and_renamed_keys_are_reported(tmp_path):
    ck = fabricate_checkpoint("genesis", "unet3d", out_channels=1)
    sd = ck["state_dict"]
    sd["module.down_tr64.ops.1.conv1.weight"] = torch.randn(64, 32, 1, 1, 1)
    sd["module.down_tr128.ops.0.conv_renamed.weight"] = sd.pop("module.down_tr128.ops.0.conv1.weight")
    model = build_backbone("unet3d", 1, 1)
    report = load_weights(model, ck, min_encoder_coverage=0.5)
    assert report.mismatched == [("down_tr64.ops.1.conv1.weight", (64, 32, 1, 1, 1), (64, 32, 3, 3, 3))]
    assert report.unexpected == ["down_tr128.ops.0.conv_renamed.weight"]
    assert {"down_tr64.ops.1.conv1.weight", "down_tr128.ops.0.conv1.weight"} <= set(report.missing)
    assert report.fraction("encoder.down_tr64") < 1 and report.fraction("encoder.down_tr128") < 1
    assert "mismatched" in str(report) and "unexpected" in str(report)


def test_wrong_backbone_refused_model_untouched(tmp_path):
    torch.save(fabricate_checkpoint("suprem", "unet3d"), tmp_path / "u.pth")
    model = build_backbone("resnet10", 1, 2, widen_factor=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CoverageError) as e:
        load_weights(model, tmp_path / "u.pth")
    assert isinstance(e.value, WeightsError) and e.value.report.encoder_coverage == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_input_channel_adaptation(tmp_path):
    ck = fabricate_checkpoint("medicalnet", "resnet18", in_channels=1, widen_factor=0.25)
    model = build_backbone("resnet18", 3, 2, widen_factor=0.25)
    report = load_weights(model, ck)
    assert report.encoder_coverage == 1.0 and len(report.adapted) == 1
    w0 = ck["state_dict"]["module.conv1.weight"]
    assert torch.allclose(model.conv1.weight.sum(1), w0.sum(1), atol=1e-6)


def test_own_checkpoint_round_trip_and_head_surgery(tmp_path):
    model = build_backbone("segresnet", 1, 3, init_filters=8)
    path = save_checkpoint(model, tmp_path / "sub" / "m.pt", classes=["background", "liver", "spleen"],
                           preprocessing={"spacing": [1.5, 1.5, 1.5]}, params={"lr": 0.001}, epoch=2)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "transfer3d" and raw["version"] == 1 and raw["epoch"] == 2
    assert raw["backbone"] == {"name": "segresnet", "in_channels": 1, "out_channels": 3,
                               "kwargs": raw["backbone"]["kwargs"]} and raw["backbone"]["kwargs"]["init_filters"] == 8
    back = load_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert back.t3d_meta["preprocessing"] == {"spacing": [1.5, 1.5, 1.5]}
    # safetensors export keeps the metadata
    st = export_safetensors(path, tmp_path / "m.safetensors")
    back2 = load_pretrained(st)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back2.state_dict().values()))
    # new task: liver kept, tumor new
    new = load_pretrained(path, classes=["background", "tumor", "liver", "kidney"], keep_classes={"liver": "liver"})
    w_old, w_new = model.state_dict()["conv_final.2.conv.weight"], new.state_dict()["conv_final.2.conv.weight"]
    assert w_new.shape[0] == 4 and torch.equal(w_new[2], w_old[1]) and not torch.equal(w_new[1], w_old[2])
    assert new.load_report.head_surgery


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    model = build_backbone("unet3d", 1, 1)
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(model, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_download_file_url_checksum_and_cache(tmp_path):
    payload = tmp_path / "w.bin"
    payload.write_bytes(os.urandom(4096))
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    src = PretrainedSource("t", "unet3d", url=payload.as_uri(), sha256=digest, filename="w.bin")
    got = download(src, cache_dir=tmp_path / "cache")
    assert got.read_bytes() == payload.read_bytes()
    payload.unlink()  # second call uses the cache, verified
    assert download(src, cache_dir=tmp_path / "cache") == got
    bad = PretrainedSource("t2", "unet3d", url=got.as_uri(), sha256="a" * 64, filename="x.bin")
    with pytest.raises(WeightsError, match="expected a{64}"):
        download(bad, cache_dir=tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "x.bin").exists()
    with pytest.raises(WeightsError, match="not downloaded"):
        load_weights(build_backbone("unet3d"), "suprem_unet", cache_dir=tmp_path / "empty")


def test_registry_records():
    for name in ("suprem_unet", "suprem_segresnet", "suprem_swinunetr", "models_genesis_chest_ct",
                 "medicalnet_resnet10", "medicalnet_resnet18", "medicalnet_resnet34", "medicalnet_resnet50",
                 "monai_swinunetr_ssl"):
        s = SOURCES[name]
        assert s.citation and s.license and s.url and s.sha256 is None  # no published checksums
        if s.backbone != "swinunetr":  # the recorded arguments build (Swin UNETR cannot be built on meta)
            with torch.device("meta"):
                build_backbone(s.backbone, s.in_channels, s.out_channels, **s.backbone_kwargs)


def _cli_parallel(*calls):
    "Run several `python -m transfer3d weights ...` at once (each pays the torch/MONAI import)."
    procs = [subprocess.Popen([sys.executable, "-m", "transfer3d", "weights", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in calls]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_cli_inspect_exit_codes(tmp_path):
    torch.save(fabricate_checkpoint("genesis", "unet3d", out_channels=1), tmp_path / "g.pth")

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "ran"),))

    torch.save({"state_dict": {}, "x": Payload()}, tmp_path / "evil.pth")
    ok, low, evil = _cli_parallel(["inspect", str(tmp_path / "g.pth"), "--backbone", "unet3d", "--json"],
                                  ["inspect", str(tmp_path / "g.pth"), "--backbone", "resnet10", "--json"],
                                  ["inspect", str(tmp_path / "evil.pth"), "--backbone", "unet3d"])
    assert ok.returncode == 0, ok.stderr
    js = json.loads(ok.stdout)
    assert js["ok"] and js["format"] == "genesis" and js["coverage"]["encoder.down_tr512"]["fraction"] == 1.0
    assert js["counts"]["mismatched"] == 0 and js["counts"]["unexpected"] == 0
    assert low.returncode == 1 and json.loads(low.stdout)["encoder_coverage"] == 0.0
    assert evil.returncode == 1 and "refused to unpickle" in evil.stderr and not (tmp_path / "ran").exists()


def test_cli_in_process(tmp_path, capsys):
    from transfer3d.models.weights import cli_weights
    assert cli_weights(["inspect", str(tmp_path / "nope.pth"), "--backbone", "unet3d"]) == 1
    assert "not found" in capsys.readouterr().err
    assert cli_weights(["list"]) == 0 and "suprem_swinunetr" in capsys.readouterr().out
    assert cli_weights(["list", "--json"]) == 0 and json.loads(capsys.readouterr().out)[0]["name"] == "suprem_unet"
    with pytest.raises(SystemExit) as e:
        cli_weights(["inspect"])  # CKPT missing: argparse error
    assert e.value.code == 2
