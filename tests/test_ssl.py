"""Self-supervised restoration pre-training (transfer3d.ssl): the four transformations, crops, a tiny run."""
import numpy as np
import pytest
import torch

from transfer3d.core import DataError, ParamsError
from transfer3d.models.weights import load_pretrained
from transfer3d.ssl import (GenesisTransform, RestorationCrops, SSLParams, bezier_curve, box_mask, in_paint,
                            local_pixel_shuffle, nonlinear_transform, out_paint, run_ssl_pretrain,
                            unlabeled_volumes, window01)

from conftest import ROOT

torch.set_num_threads(2)
SMALL_UNET = {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1}


def test_bezier_endpoints():
    xs, ys = bezier_curve([(0, 0), (0.2, 0.9), (0.6, 0.1), (1, 1)], n=50)
    assert (xs[0], ys[0]) == (0, 0) and np.allclose((xs[-1], ys[-1]), (1, 1))


@pytest.mark.parametrize("seed", range(20))
def test_nonlinear_monotonic_unit_interval(seed):
    x = np.linspace(0, 1, 301)
    y, rec = nonlinear_transform(x, np.random.default_rng(seed))
    d = np.diff(y)
    assert (d >= -1e-12).all() if not rec["inverted"] else (d <= 1e-12).all()
    assert 0 <= y.min() and y.max() <= 1
    assert np.array_equal(y, nonlinear_transform(x, np.random.default_rng(seed))[0])


def test_nonlinear_both_directions_occur():
    rec = [nonlinear_transform(np.zeros(3), np.random.default_rng(s))[1]["inverted"] for s in range(40)]
    assert any(rec) and not all(rec)


def test_pixel_shuffle_preserves_block_multisets():
    x = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    for seed in range(5):
        y, rec = local_pixel_shuffle(x, np.random.default_rng(seed), n_blocks=1, max_block=6)
        (lo, size), = rec["blocks"]
        sl = tuple(slice(a, a + s) for a, s in zip(lo, size))
        assert np.array_equal(np.sort(y[sl], None), np.sort(x[sl], None))
        outside = np.ones(x.shape, bool)
        outside[sl] = False
        assert np.array_equal(y[outside], x[outside])
    y, rec = local_pixel_shuffle(x, np.random.default_rng(1), n_blocks=200, max_block=3)
    assert np.array_equal(np.sort(y, None), np.sort(x, None)) and not np.array_equal(x, y)
    assert len(rec["blocks"]) == 200
    assert np.array_equal(y, local_pixel_shuffle(x, np.random.default_rng(1), n_blocks=200, max_block=3)[0])


def test_in_painting_masks_only_its_boxes():
    x = np.full((30, 24, 18), 0.5, np.float32)
    for seed in range(5):
        y, rec = in_paint(x, np.random.default_rng(seed))
        m = box_mask(x.shape, rec["boxes"])
        assert 1 <= len(rec["boxes"]) <= 5
        assert np.array_equal(y[~m], x[~m]) and (y[m] != 0.5).mean() > 0.99
        for _, size in rec["boxes"]:
            assert all(s // 6 <= k <= s // 3 for k, s in zip(size, x.shape)), size


def test_out_painting_keeps_only_its_boxes():
    x = np.full((28, 28, 21), 0.5, np.float32)
    for seed in range(5):
        y, rec = out_paint(x, np.random.default_rng(seed))
        m = box_mask(x.shape, rec["boxes"])
        assert np.array_equal(y[m], x[m]) and (y[~m] != 0.5).mean() > 0.99
        assert np.array_equal(y, out_paint(x, np.random.default_rng(seed))[0])


def test_genesis_transform_probabilities_and_seed():
    x = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    none = GenesisTransform(0, 0, 0, 0)
    inp, tgt, rec = none(x, np.random.default_rng(0))
    assert np.array_equal(inp, x) and np.array_equal(tgt, x) and all(v is None for v in rec.values())
    full = GenesisTransform(1, 1, 1, 1, 1)
    inp, tgt, rec = full(x, np.random.default_rng(3))
    assert rec["flip"] and rec["shuffle"] and rec["nonlinear"] and rec["paint"]["kind"] == "in"
    assert np.array_equal(tgt, np.flip(x, rec["flip"]))
    a, b = GenesisTransform()(x, np.random.default_rng(9)), GenesisTransform()(x, np.random.default_rng(9))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ParamsError, match="p_paint"):
        GenesisTransform(p_paint=1.5)


def test_restoration_crops():
    vol = np.full((40, 40, 20), -1000.0, np.float32)
    vol[5:35, 5:35, :] = 40.0
    ds = RestorationCrops([vol], crop=24, n=3, seed=1)   # depth 20 < 24: padded
    it = ds[0]
    assert it["image"].shape == it["label"].shape == (1, 24, 24, 24)
    assert torch.equal(it["image"], RestorationCrops([vol], crop=24, n=3, seed=1)[0]["image"])
    assert 0 <= float(it["label"].min()) and float(it["label"].max()) <= 1
    assert np.allclose(window01(np.array([-2000, 0, 2000])), [0, 0.5, 1])


def test_unlabeled_volumes_errors(tmp_path):
    with pytest.raises(ParamsError, match="data_root"):
        unlabeled_volumes("nifti", 1)
    with pytest.raises(DataError, match="no files match"):
        unlabeled_volumes("nifti", 1, data_root=tmp_path)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="bad.nii.gz"):
        unlabeled_volumes("nifti", 1, data_root=tmp_path)


def test_tiny_ssl_run_and_transfer(tmp_path):
    res = run_ssl_pretrain(out_dir=str(tmp_path / "run"), backbone="unet", backbone_kwargs=SMALL_UNET, volume_size=32,
                           n_volumes=2, crop=32, n_crops=4, n_val=2, steps=2, batch_size=2, log_every=1, trainer={"tensorboard": False},
                           progress=False, num_threads=2)
    assert set(res) >= {"out_dir", "checkpoint", "metrics", "seconds"}
    m = res["metrics"]
    assert m["steps"] == 2 and m["val_mse"] >= 0 and m["val_mse_identity"] >= 0
    for f in ("pretrained.pt", "metrics.json", "params.yaml", "train_log.jsonl"):
        assert (tmp_path / "run" / f).is_file(), f
    seg = load_pretrained(res["checkpoint"], out_channels=3)
    assert seg.load_report.encoder_coverage == 1.0
    assert seg(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    assert load_pretrained(res["checkpoint"]).t3d_config["out_channels"] == 1


def test_ssl_params():
    p = SSLParams.load(ROOT / "params" / "pretrain_ssl_quick.yaml")
    assert p.mode == "ssl" and p.window == (-1000.0, 1000.0)
    with pytest.raises(ParamsError, match="crops"):
        SSLParams.load(overrides=["crops=3"])
    from transfer3d.vdt import train_config

    with pytest.raises(ParamsError, match="top-level"):
        train_config(SSLParams(trainer={"steps": 3}))
    assert train_config(SSLParams(trainer={"grad_accum": 2})).grad_accum == 2
