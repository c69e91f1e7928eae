"""Tests of transfer3d.evaluate: metrics against hand-computed cases, statistics, savings, inversion, NIfTI output."""
from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from transfer3d.core import DataError, ParamsError
from transfer3d.evaluate import (
    accuracy, annotation_savings, balanced_accuracy, bootstrap_ci, compare_methods, dice, evaluate_segmentation,
    hd95, holm, invert_prediction, learning_curve, nsd, paired_wilcoxon, predict_case, roc_auc, save_label_nifti,
    segmentation_metrics, sliding_window_predict, spacing_from_affine, summarize_segmentation, surface_distances,
)


def cube(shift=(0, 0, 0), s=10, shape=(32, 32, 32)):
    m = np.zeros(shape, bool)
    o = np.array([10, 10, 10]) + np.asarray(shift)
    m[o[0]:o[0] + s, o[1]:o[1] + s, o[2]:o[2] + s] = True
    return m


# --- segmentation metrics -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_shifted_cube_dice_hd95_nsd(k):
    ref = cube()
    pred = cube((k, 0, 0))
    assert dice(pred, ref) == pytest.approx((10 - k) / 10)
    assert hd95(pred, ref) == pytest.approx(k)
    assert hd95(pred, ref, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0 * k)  # shift along the 2 mm axis
    assert hd95(cube((0, k, 0)), ref, spacing=(2.0, 1.0, 1.0)) == pytest.approx(1.0 * k)
    assert nsd(pred, ref, tolerance_mm=2.0 * k, spacing=(2.0, 1.0, 1.0)) == pytest.approx(1.0)
    assert nsd(pred, ref, tolerance_mm=2.0 * k - 0.5, spacing=(2.0, 1.0, 1.0)) < 1.0


def test_nsd_hand_counted():
    # s=10 cube, shift 1 along x, 2x1x1 mm: 488 surface voxels; 100 leading-face voxels at 2 mm, of the 64
    # trailing-face interior voxels 28 at 1 mm and 36 at 2 mm (same counts in the other direction)
    ref, pred = cube(), cube((1, 0, 0))
    assert nsd(pred, ref, 1.5, spacing=(2, 1, 1)) == pytest.approx(352 / 488)
    assert nsd(pred, ref, 0.5, spacing=(2, 1, 1)) == pytest.approx(324 / 488)
    assert nsd(pred, ref, 1.0, spacing=(2, 1, 1)) == pytest.approx(352 / 488)  # equal to tolerance counts


def test_empty_mask_conventions():
    e = np.zeros((32, 32, 32), bool)
    m = segmentation_metrics(e, e)
    assert all(math.isnan(m[k]) for k in ("dice", "nsd", "hd95"))
    diag = math.sqrt(64**2 + 32**2 + 32**2)
    for p, r in ((cube(), e), (e, cube())):
        m = segmentation_metrics(p, r, spacing=(2, 1, 1))
        assert (m["dice"], m["nsd"]) == (0.0, 0.0)
        assert m["hd95"] == pytest.approx(diag)
    with pytest.raises(ParamsError):
        surface_distances(e, cube())


def test_agrees_with_monai_on_irregular_shapes():
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
    from scipy import ndimage

    rng = np.random.default_rng(3)
    a, b = (ndimage.gaussian_filter(rng.normal(size=(30, 28, 24)), 2.5) > 0.04 for _ in range(2))
    sp = (0.7, 1.1, 2.0)
    oh = lambda m: torch.from_numpy(np.stack([~m, m]))[None].float()  # noqa: E731
    ours = segmentation_metrics(a, b, spacing=sp, tolerance_mm=1.5)
    assert ours["hd95"] == pytest.approx(compute_hausdorff_distance(oh(a), oh(b), percentile=95, spacing=sp).item(), abs=1e-4)
    assert ours["nsd"] == pytest.approx(compute_surface_dice(oh(a), oh(b), [1.5], spacing=sp).item(), abs=1e-4)


def test_metric_argument_errors():
    with pytest.raises(ParamsError, match="spacing"):
        hd95(cube(), cube(), spacing=(1, 0, 1))
    with pytest.raises(ParamsError, match="shape"):
        dice(cube(), np.zeros((8, 8, 8)))
    with pytest.raises(ParamsError, match="tolerance"):
        nsd(cube(), cube(), -1)


def test_spacing_from_affine():
    aff = np.array([[0, 0, 3.0, 0], [-0.7, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1]])
    assert spacing_from_affine(aff) == (0.7, 0.8, 3.0)


def test_evaluate_segmentation_table_and_summary():
    ref = np.zeros((32, 32, 32), np.uint8)
    ref[cube()] = 1
    pred = np.zeros_like(ref)
    pred[cube((2, 0, 0))] = 1
    pred[0:3, 0:3, 0:3] = 2  # a class absent from the reference: a false positive
    t = evaluate_segmentation({"a": pred, "b": ref}, {"a": ref, "b": ref}, {"organ": 1, "tumor": 2},
                              spacing={"a": (2, 1, 1), "b": (1, 1, 1)})
    assert list(t.columns) == ["case", "class", "label", "dice", "nsd", "hd95", "pred_voxels", "ref_voxels"]
    row = t.set_index(["case", "class"])
    assert row.loc[("a", "organ"), "dice"] == pytest.approx(0.8)
    assert row.loc[("a", "organ"), "hd95"] == pytest.approx(4.0)
    assert row.loc[("a", "tumor"), "dice"] == 0.0
    assert math.isnan(row.loc[("b", "tumor"), "dice"])
    s = summarize_segmentation(t, n_boot=200)
    assert s.loc["tumor", "dice_n"] == 1  # NaN skipped
    assert s.loc["organ", "dice"] == pytest.approx(0.9)
    assert s.loc["mean", "dice"] == pytest.approx(np.mean([(0.8 + 0.0) / 2, 1.0]))


def test_evaluate_segmentation_bad_inputs():
    ref = np.zeros((8, 8, 8), np.uint8)
    with pytest.raises(DataError, match="case_0"):
        evaluate_segmentation([np.zeros((8, 8, 9), np.uint8)], [ref], ["x"])
    with pytest.raises(ParamsError, match="spacing"):
        evaluate_segmentation([ref, ref], [ref, ref], ["x"], spacing=[(1, 1, 1)])
    with pytest.raises(ParamsError, match="tolerance"):
        evaluate_segmentation([ref], [ref], ["x", "y"], tolerance_mm={"x": 1.0})


# --- classification ---------------------------------------------------------------------------------

def test_auc_perfect_random_inverted():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.3, 0.7, 0.9, 0.2, 0.8])
    assert roc_auc(y, s) == 1.0
    assert roc_auc(y, 1 - s) == 0.0
    assert roc_auc(y, np.zeros(6)) == 0.5
    rng = np.random.default_rng(0)
    assert abs(roc_auc(rng.integers(0, 2, 20000), rng.random(20000)) - 0.5) < 0.02
    assert roc_auc([0, 1, 0, 1], [0.2, 0.2, 0.1, 0.9]) == 0.875  # one tied pair counts 1/2
    assert roc_auc(y, np.stack([1 - s, s], 1)) == 1.0  # (n, 2) scores
    scores = np.eye(3)[[0, 1, 2, 2]]
    # by hand, one-vs-rest: class 0 perfect (1), class 1 (1+1+.5+.5)/4, class 2 (1+1+.5)/3
    assert roc_auc([0, 1, 2, 1], scores) == pytest.approx(np.mean([1.0, 0.75, 2.5 / 3]))
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_accuracy_and_balanced_accuracy():
    assert accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == 0.75
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == 0.5
    assert balanced_accuracy([0, 1, 2, 2], [0, 1, 2, 0]) == pytest.approx((1 + 1 + 0.5) / 3)


# --- statistics -------------------------------------------------------------------------------------

def test_bootstrap_ci_contains_mean_narrows_and_is_seeded():
    v = np.random.default_rng(0).normal(0.7, 0.1, 400)
    a, b = bootstrap_ci(v[:25], seed=1), bootstrap_ci(v, seed=1)
    assert a.lo <= a.mean <= a.hi and b.lo <= b.mean <= b.hi
    assert (b.hi - b.lo) < (a.hi - a.lo)
    assert bootstrap_ci(v, seed=5) == bootstrap_ci(v, seed=5)
    assert bootstrap_ci([np.nan, np.nan]).n == 0


def test_holm_hand_example():
    adj, rej = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
    assert rej.tolist() == [True, False, False, True]
    adj, rej = holm([0.5, 0.9])
    np.testing.assert_allclose(adj, [1.0, 1.0])  # capped at 1, monotone


def test_paired_wilcoxon():
    assert paired_wilcoxon([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])["p"] == 1.0
    r = paired_wilcoxon([0.9, np.nan, 0.8], [0.5, 0.4, np.nan])
    assert r["n"] == 1
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.8, 25)
    assert paired_wilcoxon(base + 0.04 + rng.normal(0, 0.01, 25), base)["p"] < 1e-3


def test_compare_methods_holm_over_methods():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.5, 0.8, 20)
    rows = [{"method": m, "case": i, "class": "c", "dice": base[i] + d + rng.normal(0, 0.01)}
            for m, d in (("scratch", 0.0), ("ft", 0.05), ("same", 0.0)) for i in range(20)]
    out = compare_methods(pd.DataFrame(rows), baseline="scratch").set_index("method")
    assert out.loc["ft", "significant"] and not out.loc["same", "significant"]
    assert (out["p_holm"] >= out["p"]).all()


# --- learning curves and savings ------------------------------------------------------------------

def known_curve():
    return pd.DataFrame({"method": ["scratch"] * 4 + ["A", "B", "C"], "n_train": [1, 2, 4, 8, 1, 1, 1],
                         "seed": 0, "dice": [0.5, 0.6, 0.7, 0.8, 0.7, 0.65, 0.85]})


def test_savings_known_by_construction():
    s = annotation_savings(known_curve()).set_index("method")
    assert s.loc["A", "n_scratch_needed"] == pytest.approx(4.0)
    assert s.loc["A", "savings"] == pytest.approx(0.75)
    assert s.loc["A", "savings_text"] == "75 %"
    assert s.loc["B", "n_scratch_needed"] == pytest.approx(2 ** 1.5)  # linear in log2(n)
    assert s.loc["C", "bound"] == ">" and s.loc["C", "savings"] == pytest.approx(1 - 1 / 8)
    assert s.loc["C", "savings_text"].startswith("≥")


def test_savings_from_learning_curve_output_and_seeds():
    rows = []
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        for n, d in zip((1, 2, 4, 8), (0.5, 0.6, 0.7, 0.8)):
            rows.append({"method": "scratch", "n_train": n, "seed": seed, "dice": d + noise})
        rows.append({"method": "ft", "n_train": 2, "seed": seed, "dice": 0.8 - noise})
    df = pd.DataFrame(rows)
    curve = learning_curve(df)
    assert set(curve.columns) >= {"method", "n_train", "mean", "lo", "hi", "n_seeds"}
    assert (curve.n_seeds == 3).all() and (curve.lo <= curve["mean"]).all()
    a = annotation_savings(df)
    b = annotation_savings(curve)
    assert a.savings.item() == pytest.approx(0.75) and b.savings.item() == pytest.approx(0.75)
    with pytest.raises(ParamsError, match="scratch"):
        annotation_savings(df, scratch="nope")


# --- inference, inversion, NIfTI ------------------------------------------------------------------

def _aniso_case():
    from monai.data import MetaTensor

    shape = (30, 40, 10)
    aff = np.diag([-2.0, -1.0, 3.5, 1.0])
    aff[:3, 3] = (40, 30, -10)
    lab = np.zeros(shape, np.uint8)
    lab[5:25, 10:30, 2:8] = 1
    img = MetaTensor(torch.from_numpy(lab[None].astype(np.float32)), affine=torch.from_numpy(aff))
    return {"image": img, "label": MetaTensor(torch.from_numpy(lab[None]), affine=torch.from_numpy(aff))}, aff, lab


def _pre():
    import monai.transforms as mt

    return mt.Compose([mt.Orientationd(keys=["image", "label"], axcodes="RAS"),
                       mt.Spacingd(keys=["image", "label"], pixdim=(1.5, 1.5, 1.5), mode=("bilinear", "nearest"))])


def test_inverse_transform_round_trip():
    case, aff, lab = _aniso_case()
    pre = _pre()
    out = pre(case)
    assert tuple(out["image"].shape[1:]) != lab.shape
    back = invert_prediction(out["label"].to(torch.uint8), pre, out)
    assert tuple(back.shape) == (1, *lab.shape) and back.dtype == torch.uint8
    np.testing.assert_allclose(back.affine.numpy(), aff, atol=1e-5)
    assert (back[0].numpy() == lab).mean() > 0.97
    # a prediction that already carries the history (as sliding_window_predict keeps it)
    prob = sliding_window_predict(torch.nn.Conv3d(1, 2, 1), out["image"], roi_size=16, precision="fp32")
    back2 = invert_prediction(prob, pre)
    assert tuple(back2.shape) == (2, *lab.shape) and back2.dtype == torch.float32
    np.testing.assert_allclose(back2.affine.numpy(), aff, atol=1e-5)
    with pytest.raises(ParamsError, match="history"):
        invert_prediction(torch.zeros(1, 4, 4, 4), pre)


def test_save_label_nifti_affine_dtype_atomic(tmp_path):
    aff = np.diag([-0.8, 0.8, 2.5, 1.0])
    lab = np.random.default_rng(0).integers(0, 4, (6, 7, 5))
    for name in ("p.nii.gz", "p.nii"):
        f = save_label_nifti(lab, tmp_path / name, aff)
        img = nib.load(f)
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, aff)
        np.testing.assert_array_equal(np.asarray(img.dataobj), lab)
    before = (tmp_path / "p.nii.gz").read_bytes()
    with pytest.raises(ParamsError, match="255"):
        save_label_nifti(lab + 300, tmp_path / "p.nii.gz", aff)
    assert (tmp_path / "p.nii.gz").read_bytes() == before  # untouched
    assert sorted(os.listdir(tmp_path)) == ["p.nii", "p.nii.gz"]  # no temporary files left
    with pytest.raises(ParamsError, match="affine"):
        save_label_nifti(lab, tmp_path / "q.nii.gz")


def test_sliding_window_predict_outputs_and_restores_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1)).train()
    x = torch.randn(1, 20, 18, 16)
    prob = sliding_window_predict(net, x, roi_size=8, overlap=0.5, precision="fp32")
    assert prob.shape == (3, 20, 18, 16)
    torch.testing.assert_close(prob.sum(0), torch.ones(20, 18, 16))
    lab = sliding_window_predict(net, x[None], roi_size=8, precision="fp32", output="label")
    assert lab.shape == (1, 1, 20, 18, 16) and lab.dtype == torch.uint8
    assert net.training  # restored
    lab_cl = sliding_window_predict(net, x, roi_size=8, precision="fp32", output="label", channels_last=True)
    assert (lab_cl == lab[0]).float().mean() > 0.999
    assert net[0].weight.is_contiguous()  # layout restored
    lab_bf = sliding_window_predict(net, x, roi_size=8, precision="bf16", output="label")
    assert (lab_bf == lab[0]).float().mean() > 0.95
    sig = sliding_window_predict(net, x, roi_size=8, precision="fp32", output="label", activation="sigmoid")
    assert sig.shape == (3, 20, 18, 16)
    with pytest.raises(ParamsError, match="overlap"):
        sliding_window_predict(net, x, overlap=1.0)


def test_predict_case_saves_on_original_grid(tmp_path):
    case, aff, lab = _aniso_case()
    pre = _pre()
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([-10.0, 10.0]).view(2, 1, 1, 1, 1))
        net.bias.copy_(torch.tensor([5.0, 0.0]))  # class 1 where 20 * image > 5
    out = predict_case(net, pre, case, out_path=tmp_path / "pred.nii.gz", roi_size=16, precision="fp32")
    assert tuple(out.shape) == (1, *lab.shape)
    img = nib.load(tmp_path / "pred.nii.gz")
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert img.shape == lab.shape
    assert dice(np.asarray(img.dataobj) == 1, lab == 1) > 0.9


# --- files and the command line -------------------------------------------------------------------

def _write_pair(tmp_path, name="c0", shift=1, aff=np.diag([1.0, 1.0, 2.0, 1.0])):
    ref = cube().astype(np.uint8)
    pred = cube((shift, 0, 0)).astype(np.uint8)
    save_label_nifti(pred, tmp_path / "pred" / f"{name}.nii.gz", aff)
    save_label_nifti(ref, tmp_path / "ref" / f"{name}.nii.gz", np.diag([1.0, 1.0, 2.0, 1.0]))


def test_evaluate_nifti_and_cli(tmp_path, capsys):
    from transfer3d.evaluate import cli_evaluate, evaluate_nifti

    _write_pair(tmp_path)
    t = evaluate_nifti(tmp_path / "pred", tmp_path / "ref", ["organ"])
    assert t.dice.item() == pytest.approx(0.9) and t.hd95.item() == pytest.approx(1.0)
    out = tmp_path / "res" / "m.csv"
    assert cli_evaluate([str(tmp_path / "pred"), str(tmp_path / "ref"), "--classes", "organ=1", "--out", str(out)]) == 0
    assert pd.read_csv(out).dice.item() == pytest.approx(0.9)
    assert pd.read_csv(tmp_path / "res" / "m_summary.csv").shape[0] == 2  # organ + mean
    assert "organ" in capsys.readouterr().out


def test_evaluate_nifti_bad_inputs(tmp_path):
    from transfer3d.evaluate import cli_evaluate, evaluate_nifti

    _write_pair(tmp_path, aff=np.diag([1.5, 1.5, 1.5, 1.0]))  # saved on the preprocessed grid
    with pytest.raises(DataError, match="inverted"):
        evaluate_nifti(tmp_path / "pred", tmp_path / "ref", ["organ"])
    (tmp_path / "pred" / "c0.nii.gz").write_bytes(b"\x1f\x8b\x08garbage")  # truncated gzip
    with pytest.raises(DataError, match="c0.nii.gz: cannot read NIfTI"):
        evaluate_nifti(tmp_path / "pred", tmp_path / "ref", ["organ"])
    (tmp_path / "pred" / "c0.nii.gz").unlink()
    with pytest.raises(DataError, match="no prediction for 1"):
        evaluate_nifti(tmp_path / "pred", tmp_path / "ref", ["organ"])
    with pytest.raises(DataError, match="not a folder"):
        evaluate_nifti(tmp_path / "nope", tmp_path / "ref", ["organ"])
    with pytest.raises(ParamsError, match="classes"):
        cli_evaluate([str(tmp_path / "pred"), str(tmp_path / "ref"), "--classes", "a=1", "b"])


def test_cli_subprocess(tmp_path):
    import subprocess
    import sys

    _write_pair(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "transfer3d", "evaluate", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path)
    r = run("pred", "ref", "--classes", "organ", "--out", "m.csv")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.csv").is_file() and (tmp_path / "m_summary.csv").is_file()
    r = run("nope", "ref", "--classes", "organ")
    assert r.returncode == 2 and "transfer3d evaluate: error: nope: not a folder" in r.stderr
