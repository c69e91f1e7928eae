"Transfer strategies (what trains, what stays bit-identical), the CLI end to end, classification, scratch, disjoint subjects."
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfer3d.core import ParamsError
from transfer3d.data.synth import subject_seed
from transfer3d.models.nets import build_backbone, classification_model, group_of, group_prefixes
from transfer3d.models.weights import load_pretrained, save_checkpoint
from transfer3d.pretrain import PretrainParams
from transfer3d.transfer import (DEFAULT_ORGANS, DOWNSTREAM_SEED_BASE, TransferParams, apply_strategy, as_strategy,
                                 check_disjoint, lr_multipliers, pretraining_subject_seeds, run_transfer)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(channels=[8, 16, 32, 64], strides=[2, 2, 2], num_res_units=1)
STRATEGIES = ["scratch", "full", "frozen_encoder", "head_only", "linear_probe", "freeze_stages=1", "freeze_stages=3",
              "llrd=0.5", "two_phase=5"]


def _bn_net():
    torch.manual_seed(0)
    return build_backbone("unet", 1, 3, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1, norm="batch")


def _steps(model, groups, n=2):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        model(torch.randn(2, 1, 16, 16, 16, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_exactly_its_groups(strategy):
    net = _bn_net()
    mult = lr_multipliers(net, strategy)
    groups = apply_strategy(net, strategy, lr=1e-2)
    prefixes = group_prefixes(net)
    for name, p in net.named_parameters():
        assert p.requires_grad == (mult[group_of(name, prefixes)] > 0), name
    changed = _steps(net, groups)
    for k in net.state_dict():
        if k.endswith("num_batches_tracked"):
            continue
        trainable = mult[group_of(k, prefixes)] > 0
        assert (k in changed) == trainable, (strategy, k)  # frozen weights and BN running stats bit-identical
    frozen_bn = [m for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm3d)
                 and mult[group_of(n + ".", prefixes)] == 0]
    assert all(not m.training for m in frozen_bn)  # kept in eval mode although the model is in train mode
    expected_frozen = {"scratch": 0, "full": 0, "llrd=0.5": 0, "freeze_stages=1": 1, "freeze_stages=3": 3,
                       "frozen_encoder": 4, "two_phase=5": 4, "head_only": 5, "linear_probe": 5}[strategy]
    assert sum(v == 0 for v in mult.values()) == expected_frozen


def test_llrd_and_two_phase_learning_rates():
    net = _bn_net()
    lrs = {g["name"]: g["lr"] for g in apply_strategy(net, "llrd=0.5", lr=1.0)}
    assert lrs == {"encoder.level0": 0.0625, "encoder.level1": 0.125, "encoder.level2": 0.25, "encoder.bottom": 0.5,
                   "decoder": 1.0, "head": 1.0}
    s = as_strategy({"name": "two_phase", "phase1_steps": 3, "freeze_stages": 1})
    assert [g["name"] for g in apply_strategy(net, s, phase=1)] == ["decoder", "head"]
    changed = _steps(net, apply_strategy(net, s, lr=1e-2, phase=2))
    assert any(k.startswith("model.1.") and "running_mean" in k for k in changed)  # released in phase 2
    assert not any(k.startswith("model.0.") for k in changed)  # the first stage stays frozen
    with pytest.raises(ParamsError, match="only 4 stages"):
        lr_multipliers(net, "freeze_stages=5")
    with pytest.raises(ParamsError):
        as_strategy("llrd")


def test_classifier_strategies():
    cls = classification_model(build_backbone("unet", 1, 2, **SMALL), 2)
    assert [g["name"] for g in apply_strategy(cls, "frozen_encoder")] == ["head"]
    assert all(not p.requires_grad for n, p in cls.named_parameters() if n.startswith("backbone."))


def test_no_overlap_of_pretraining_and_downstream_subjects(tmp_path):
    pre_params = PretrainParams.load(REPO / "params" / "pretrain_quick.yaml").to_dict()
    pre = pretraining_subject_seeds(pre_params)
    assert len(pre) == pre_params["data"]["synth"]["n"]
    p = TransferParams.load(overrides=["data.synth.size=16", "data.synth.n=3", "data.test=1", "data.synth.tumors=0",
                                       f"data.cache_dir={tmp_path}", f"out_dir={tmp_path}/run"])
    from transfer3d.transfer import downstream_atlas

    man = json.loads((downstream_atlas(p) / "manifest.json").read_text())
    down = {r["seed"] for r in man["subjects"]}
    assert down == {subject_seed(DOWNSTREAM_SEED_BASE, i) for i in range(3)}
    assert not down & pre
    assert all(r["id"].startswith("DS0_") for r in man["subjects"])  # pre-training ids are SYN_/VAL_
    check_disjoint(sorted(down), pre_params)  # passes
    with pytest.raises(ParamsError, match="used in pre-training"):
        check_disjoint(sorted(down), {"seed": DOWNSTREAM_SEED_BASE, "data": {"synth": {"n": 4}, "val": 1}})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("transfer")
    torch.manual_seed(0)
    save_checkpoint(build_backbone("unet", 1, 1 + len(DEFAULT_ORGANS), **SMALL), d / "pre.pt",
                    classes=["background", *DEFAULT_ORGANS], params={"seed": 0, "data": {"synth": {"n": 4}, "val": 1}})
    return d


def _quick(d):
    return ["data.synth.size=32", "data.synth.n=3", "data.test=1", "train.steps=2", "train.progress=false",
            f"data.cache_dir={d}/data", "eval.n_boot=50", "num_threads=1"]


def test_cli_end_to_end(workdir):
    out = workdir / "cli"
    args = [sys.executable, "-m", "transfer3d", "transfer", "-f", str(REPO / "params" / "transfer_quick.yaml"),
            *[a for kv in _quick(workdir) for a in ("-p", kv)], "-p", f"out_dir={out}", "-p", f"pretrained={workdir}/pre.pt",
            "-p", "strategy=two_phase=1", "-p", "n_train=1"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped"] is False
    m = json.loads((out / "metrics.json").read_text())
    for k in ("params", "strategy", "n_train", "seed", "dice", "nsd", "hd95", "dice_ci", "per_class", "timings",
              "train_cases", "test_cases", "load_report", "complete"):
        assert k in m, k
    assert set(m["per_class"]) == set(DEFAULT_ORGANS) and m["n_train"] == 1 and m["strategy"] == "two_phase=1"
    for f in ("per_case.csv", "model.pt", "train_log.jsonl", "params.yaml", "splits/train_used.txt", "splits/test.txt"):
        assert (out / f).is_file(), f
    phases = {json.loads(line)["phase"] for line in (out / "train_log.jsonl").read_text().splitlines()}
    assert phases == {1, 2}
    assert load_pretrained(out / "model.pt").load_report.encoder_coverage == 1.0
    r2 = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)  # finished: skipped
    assert r2.returncode == 0 and json.loads(r2.stdout.strip().splitlines()[-1])["skipped"] is True
    bad = subprocess.run([sys.executable, "-m", "transfer3d", "transfer", "-p", "strategy=full", "-p", f"out_dir={out}x"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "needs `pretrained`" in bad.stderr


def test_scratch_needs_no_checkpoint(workdir):
    res = run_transfer(None, _quick(workdir) + [f"out_dir={workdir}/scratch", "strategy=scratch", "n_train=1",
                                               "train.steps=1", f"backbone_kwargs={json.dumps(SMALL)}"])
    assert res["pretrained"] is None and res["load_report"] is None and 0 <= res["dice"] <= 1


def test_classification_end_to_end(workdir):
    res = run_transfer(None, _quick(workdir) + [f"out_dir={workdir}/cls", "task=lesion_cls", "strategy=frozen_encoder",
                                               f"pretrained={workdir}/pre.pt", "n_train=2", "train.steps=3",
                                               "data.synth.crop_size=16"])
    for k in ("auc", "accuracy", "balanced_accuracy", "accuracy_ci"):
        assert k in res
    assert res["kind"] == "classification" and res["classes"] == ["cyst", "solid_tumor"]
    assert 0 <= res["accuracy"] <= 1
    ck = torch.load(workdir / "cls" / "model.pt", weights_only=True)
    assert ck["task"] == "classification" and "classifier" in ck
