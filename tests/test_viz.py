"""transfer3d.viz: every figure on numpy, torch, MetaTensor and NIfTI inputs; spacing; colours; fallbacks."""
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from transfer3d.core import DataError, ParamsError
from transfer3d import viz

SPACING = (1.0, 1.0, 3.0)
LABELS = {"background": 0, "liver": 1, "spleen": 2, "liver_tumor": 3}


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(np.arange(32), np.arange(28), np.arange(12), indexing="ij")
    img = np.full(x.shape, -1000, np.float32)
    body = ((x - 16) / 14) ** 2 + ((y - 14) / 12) ** 2 + ((z - 6) / 6) ** 2 <= 1
    img[body] = 20
    lab = np.zeros(x.shape, np.uint8)
    lab[(((x - 11) / 5) ** 2 + ((y - 14) / 5) ** 2 + ((z - 6) / 3) ** 2 <= 1)] = 1
    lab[(((x - 22) / 3) ** 2 + ((y - 12) / 3) ** 2 + ((z - 6) / 2) ** 2 <= 1)] = 2
    lab[(((x - 11) / 1.5) ** 2 + ((y - 14) / 1.5) ** 2 + ((z - 6) / 1.2) ** 2 <= 1)] = 3
    img += rng.normal(0, 5, img.shape).astype(np.float32)
    return img, lab


@pytest.fixture(scope="module")
def vol():
    return _volume()


@pytest.fixture(params=["numpy", "torch", "metatensor", "nifti"])
def inputs(request, vol, tmp_path):
    "The same image/label pair in each supported form, and the spacing to pass explicitly (or None)."
    img, lab = vol
    aff = np.diag([*SPACING, 1.0])
    kind = request.param
    if kind == "numpy":
        return img, lab, SPACING
    if kind == "torch":  # channel-first tensors, spacing given explicitly
        return torch.from_numpy(img)[None], torch.from_numpy(lab)[None], SPACING
    if kind == "metatensor":
        from monai.data import MetaTensor

        return (MetaTensor(torch.from_numpy(img)[None], affine=torch.from_numpy(aff)),
                MetaTensor(torch.from_numpy(lab)[None], affine=torch.from_numpy(aff)), None)
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "seg.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", None


def test_as_volume_every_input(inputs, vol):
    img, lab, sp = inputs
    arr, spacing = viz.as_volume(img, sp)
    assert arr.shape == vol[0].shape and arr.dtype == np.float32
    assert spacing == SPACING
    assert np.array_equal(arr, vol[0])
    assert np.array_equal(viz.as_label(lab, sp)[0], vol[1])


def test_figures_every_input(inputs):
    img, lab, sp = inputs
    assert len(viz.show_planes(img, lab, spacing=sp, labels=LABELS).axes) == 3
    assert len(viz.show_comparison(img, lab, lab, spacing=sp, planes=("axial", "sagittal")).axes) == 8
    assert len(viz.show_grid([(img, lab), (img, lab, sp), img], spacing=sp, ncols=2).axes) == 3
    fig = viz.show_surface(lab, spacing=sp, labels=LABELS)
    assert len(fig.axes) == 1 and fig.axes[0].name == "3d"
    assert len(viz.show_mip(img, lab, spacing=sp).axes) == 3
    assert viz.show_planes(img, lab, spacing=sp)._repr_png_().startswith(b"\x89PNG")


def test_anisotropic_spacing_sets_aspect(vol):
    img, lab = vol
    fig = viz.show_planes(img, lab, spacing=(0.8, 1.0, 4.0))
    axial, coronal, sagittal = (a.get_aspect() for a in fig.axes)
    assert axial == pytest.approx(1.0 / 0.8)
    assert coronal == pytest.approx(4.0 / 0.8)
    assert sagittal == pytest.approx(4.0 / 1.0)
    fig = viz.show_comparison(img, lab, lab, spacing=(1, 1, 5), planes="coronal")
    assert {round(a.get_aspect(), 6) for a in fig.axes} == {5.0}
    # the slicer's PNG is resampled to physical proportions: 32 mm wide, 12 * 5 = 60 mm tall
    rgb = viz.render_slice(img, lab, "coronal", spacing=(1, 1, 5), size=120)
    assert rgb.shape == (120, 64, 3)


def test_surface_in_mm(vol):
    _, lab = vol
    fig = viz.show_surface(lab, spacing=(1, 1, 3), classes=[1])
    ax = fig.axes[0]
    assert ax.get_zlim()[1] == pytest.approx(12 * 3)
    assert len(ax.collections) == 1
    verts, faces = viz.label_meshes(lab, spacing=(1, 1, 3))[1]
    z = np.nonzero((lab == 1).any((0, 1)))[0]  # slices holding liver
    assert (z.min() - 1) * 3 <= verts[:, 2].min() < verts[:, 2].max() <= (z.max() + 1) * 3  # mm, not voxels
    assert verts[:, 2].max() - verts[:, 2].min() > 2 * (z.max() - z.min())


def test_colours_fixed_per_class(vol):
    img, lab = vol
    liver = np.array(viz.class_color("liver"))
    a = viz.render_slice(img, lab, "axial", 6, alpha=1.0, labels=LABELS)
    only_liver = np.where(lab == 1, 1, 0)
    b = viz.render_slice(img, only_liver, "axial", 6, alpha=1.0, labels={"liver": 1})
    # the liver is drawn in the same colour whatever the other classes and their numbering
    assert (a == liver).all(-1).sum() > 0 and ((a == liver).all(-1) == (b == liver).all(-1)).all()
    c = viz.render_slice(img, np.where(lab == 1, 7, 0), "axial", 6, alpha=1.0, labels={"liver": 7})
    assert (c == liver).all(-1).sum() == (a == liver).all(-1).sum()
    pal = viz.label_palette(LABELS)
    assert tuple(pal[1]) == viz.class_color("liver") and tuple(pal[0]) == (0, 0, 0)
    assert tuple(pal[3]) == viz.CLASS_COLORS["liver_tumor"]
    # unnamed classes: fixed by id
    assert tuple(viz.label_palette(None, 5)[4]) == viz.ID_COLORS[4]
    # the legend uses the same colours
    fig = viz.show_planes(img, lab, labels=LABELS)
    handles = fig.legends[0].legend_handles
    assert [h.get_label() for h in handles] == ["liver", "spleen", "liver_tumor"]
    assert tuple(np.round(np.array(handles[0].get_facecolor()[:3]) * 255).astype(int)) == viz.class_color("liver")


def test_window_presets(vol):
    img, _ = vol
    assert viz.window_range(img, "abdomen") == (-160.0, 240.0)
    assert viz.window_range(img, (400, 40)) == (-160.0, 240.0)
    assert viz.window_range(img) == (-160.0, 240.0)  # HU image
    lo, hi = viz.window_range(img + 1000, "mr")
    assert lo < hi
    with pytest.raises(ParamsError, match="unknown preset"):
        viz.window_range(img, "abdomin")
    with pytest.raises(ParamsError, match="width must be > 0"):
        viz.window_range(img, (0, 40))


def test_bad_inputs(tmp_path, vol):
    img, lab = vol
    with pytest.raises(DataError, match="no such file"):
        viz.as_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="bad.nii.gz: cannot read as NIfTI"):
        viz.show_planes(tmp_path / "bad.nii.gz")
    with pytest.raises(ParamsError, match="expected a 3D"):
        viz.show_planes(img[:, :, 0])
    with pytest.raises(ParamsError, match="label: shape"):
        viz.show_planes(img, lab[:, :, :5])
    with pytest.raises(ParamsError, match="plane"):
        viz.show_grid([img], plane="transverse")
    with pytest.raises(ParamsError, match="backend"):
        viz.view(img, backend="vtk")
    with pytest.raises(ParamsError, match="cannot display a dict"):
        viz.as_volume({"a": 1})


def test_prediction_channels_argmax(vol):
    img, lab = vol
    logits = np.eye(4, dtype=np.float32)[lab].transpose(3, 0, 1, 2)[None]  # (1, C, X, Y, Z)
    assert np.array_equal(viz.as_label(logits)[0], lab)
    fig = viz.show_comparison(img, lab, torch.from_numpy(logits))
    assert len(fig.axes) == 4 and "fg Dice 1.000" in fig.axes[3].get_title()


def _log():
    return [{"epoch": e, "train_loss": 1 / (e + 1), "lr": 1e-3, **({"val_dice": e / 10} if e % 2 else {})}
            for e in range(10)]


def test_training_curves_sources(tmp_path):
    import pandas as pd

    p = tmp_path / "log.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in _log()))
    c = tmp_path / "log.csv"
    pd.DataFrame(_log()).to_csv(c, index=False)
    for src in (_log(), p, c, pd.DataFrame(_log())):
        fig = viz.plot_training(src)
        assert [a.get_title() for a in fig.axes] == ["loss", "metric", "learning rate"]
    assert len(viz.plot_training(_log(), metrics=["train_loss"]).axes) == 1
    (tmp_path / "broken.jsonl").write_text('{"epoch": 1}\n{not json')
    with pytest.raises(DataError, match="broken.jsonl: cannot parse"):
        viz.plot_training(tmp_path / "broken.jsonl")


def test_learning_curves_ci():
    rows = [{"strategy": s, "n_labeled": n, "dice": 0.5 + 0.01 * n + 0.01 * k + (0.1 if s == "ft" else 0)}
            for s in ("scratch", "ft") for n in (1, 2, 4) for k in range(4)]
    fig = viz.plot_learning_curves(rows)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and len(ax.lines) == 2 and len(ax.collections) == 2
    y = ax.lines[0].get_ydata()
    assert [l.get_label() for l in ax.lines] == ["scratch", "ft"]  # order of appearance
    assert np.allclose(y, [0.5 + 0.01 * n + 0.015 for n in (1, 2, 4)])
    # 95 % band: mean +- t(0.975, 3) * sd / sqrt(4); sd of (0, .01, .02, .03) = 0.0129
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    half = 3.182446 * np.std([0, 0.01, 0.02, 0.03], ddof=1) / 2
    assert band.max() == pytest.approx(0.5 + 0.04 + 0.015 + half, abs=1e-6)
    # one run per point: no band
    single = [r for r in rows if r["dice"] == 0.5 + 0.01 * r["n_labeled"] + (0.1 if r["strategy"] == "ft" else 0)]
    assert len(viz.plot_learning_curves(single).axes[0].collections) == 0
    with pytest.raises(ParamsError, match="'n_volumes' not in results"):
        viz.plot_learning_curves(rows, x="n_volumes")


def test_view_falls_back_without_backends(vol, monkeypatch):
    img, lab = vol
    for mod in ("ipyniivue", "itkwidgets"):
        monkeypatch.setitem(sys.modules, mod, None)  # import of these now fails
    v = viz.view(img, lab, spacing=SPACING)
    assert v.backend == "slicer" and isinstance(v.widget, viz.Slicer)
    assert len(v.figure.axes) == 3 and v.figure._repr_png_().startswith(b"\x89PNG")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    v = viz.view(img, lab, spacing=SPACING)
    assert v.backend == "static" and v.widget is None and len(v.figure.axes) == 3
    with pytest.warns(UserWarning, match="ipyniivue"):
        v = viz.view(img, backend="niivue")
    assert v.backend == "static"


def test_view_niivue(vol):
    pytest.importorskip("ipyniivue")
    img, lab = vol
    v = viz.view(img, lab, spacing=SPACING, labels=LABELS)
    assert v.backend == "niivue" and len(v.widget.volumes) == 2
    # more names than classes present, and classes without names
    assert viz.view(img, lab, labels={"liver": 1, "a": 5, "b": 9}).backend == "niivue"
    assert viz.view(img, lab, labels={"liver": 1}).backend == "niivue"
    header = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(v.widget.volumes[1].data))
    assert header.header.get_zooms()[:3] == SPACING
    assert len(v.figure.axes) == 3


def test_slicer_widgets(vol):
    img, lab = vol
    s = viz.Slicer(img, lab, spacing=SPACING, labels=LABELS, alpha=1.0)
    first = s.image_widget.value
    s.index.value = s.index.value + 1
    assert s.image_widget.value != first
    s.plane.value = "sagittal"
    assert s.index.max == img.shape[0] - 1
    s.toggles[1].value = False
    from PIL import Image
    import io

    pix = np.asarray(Image.open(io.BytesIO(s.image_widget.value)).convert("RGB"))
    assert not (pix == np.array(viz.class_color("liver"))).all(-1).any()


def test_import_is_light():
    code = ("import sys, transfer3d.viz; bad = [m for m in ('ipywidgets', 'ipyniivue', 'itkwidgets', 'anywidget')"
            " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
