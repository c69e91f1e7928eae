"""Every bad-input kind `transfer3d check` must catch, fabricated in tmp_path, with the named fault asserted."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from transfer3d.core import DataError
from transfer3d.data.sources import (
    cli_check, detect_layout, load_volume, read_dataset, save_nifti, validate, write_csv, write_msd, write_nnunet,
)

S = 12  # voxels per axis: tiny, so the whole file runs in a few seconds
AFF = np.diag([1.5, 1.5, 2.0, 1.0])


def _sphere(c, r):
    g = np.indices((S, S, S)).transpose(1, 2, 3, 0)
    return (np.linalg.norm(g - np.array(c), axis=-1) < r).astype(np.uint8)


def make_atlas(root: Path, n: int = 2) -> Path:
    "A clean AbdomenAtlas-style dataset: ct.nii.gz + segmentations/{liver,spleen}.nii.gz per case."
    for i in range(n):
        d = root / f"case{i}"
        rng = np.random.default_rng(i)
        save_nifti(rng.normal(0, 100, (S, S, S)).astype(np.float32), AFF, d / "ct.nii.gz")
        save_nifti(_sphere((4, 6, 6), 3), AFF, d / "segmentations" / "liver.nii.gz")
        save_nifti(_sphere((9, 6, 6), 2), AFF, d / "segmentations" / "spleen.nii.gz")
    return root


@pytest.fixture
def atlas(tmp_path):
    return make_atlas(tmp_path / "atlas")


@pytest.fixture
def nnunet(tmp_path, atlas):
    write_nnunet(read_dataset(atlas), tmp_path / "nnunet")
    return tmp_path / "nnunet"


@pytest.fixture
def msd(tmp_path, atlas):
    write_msd(read_dataset(atlas), tmp_path / "msd")
    return tmp_path / "msd"


def faults(rep, level="error"):
    return [(Path(p.file).name, p.fault) for p in rep.problems if p.level == level]


def only_fault(rep, name, text):
    "Exactly the errors expected: every error is on file `name` and mentions `text`."
    errs = faults(rep)
    assert errs, rep.format()
    assert all(f == name and text in msg for f, msg in errs), rep.format()


# ------------------------------------------------------------------ clean datasets

@pytest.mark.parametrize("layout", ["atlas", "msd", "nnunet", "csv"])
def test_clean_dataset_in_every_layout(tmp_path, atlas, layout):
    src = read_dataset(atlas)
    path = {"atlas": lambda: atlas,
            "msd": lambda: write_msd(src, tmp_path / "m").parent,
            "nnunet": lambda: write_nnunet(src, tmp_path / "n").parent,
            "csv": lambda: write_csv(src, tmp_path / "c" / "list.csv", copy_files=True)}[layout]()
    assert detect_layout(path) == layout
    rep = validate(path)
    assert rep.ok and not rep.problems, rep.format()
    assert rep.n_cases == 2


# ------------------------------------------------------------------ file-level faults

def test_missing_file(nnunet):
    (nnunet / "imagesTr" / "case1_0000.nii.gz").unlink()
    only_fault(validate(nnunet), "case1_0000.nii.gz", "missing file")


def test_missing_mask_listed_in_manifest(atlas):
    (atlas / "manifest.json").write_text(json.dumps({"case0": ["liver", "spleen"], "case1": ["liver", "spleen"]}))
    (atlas / "case1" / "segmentations" / "spleen.nii.gz").unlink()
    only_fault(validate(atlas), "spleen.nii.gz", "missing file")


def test_not_gzip(msd):
    p = msd / "imagesTr" / "case0.nii.gz"
    p.write_bytes(gzip.decompress(p.read_bytes()))
    only_fault(validate(msd), "case0.nii.gz", "not a gzip file")
    with pytest.raises(DataError, match="not a gzip file"):
        load_volume(p)


def test_truncated_gzip(msd):
    p = msd / "labelsTr" / "case1.nii.gz"
    p.write_bytes(p.read_bytes()[:-40])
    only_fault(validate(msd), "case1.nii.gz", "truncated gzip")
    with pytest.raises(DataError, match="truncated gzip"):
        load_volume(p, "label")


def test_not_nifti(msd):
    p = msd / "imagesTr" / "case0.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a nifti header" * 40))
    only_fault(validate(msd), "case0.nii.gz", "not a NIfTI file")
    with pytest.raises(DataError, match="not a NIfTI"):
        load_volume(p)


def test_not_3d(msd):
    p = msd / "imagesTr" / "case0.nii.gz"
    save_nifti(np.zeros((S, S), np.float32), AFF, p)
    rep = validate(msd)
    assert ("case0.nii.gz", "not 3D: shape (12, 12) (need X,Y,Z or X,Y,Z,1)") in faults(rep), rep.format()
    with pytest.raises(DataError, match="not 3D"):
        load_volume(p)


def test_4d_with_two_channels_refused_one_channel_accepted(msd):
    p = msd / "imagesTr" / "case0.nii.gz"
    arr, aff = load_volume(p)
    save_nifti(arr[..., None], aff, p)  # X,Y,Z,1 is fine
    assert validate(msd).ok
    assert load_volume(p)[0].shape == (S, S, S)
    save_nifti(np.stack([arr, arr], -1), aff, p)
    only_fault(validate(msd), "case0.nii.gz", "not 3D")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_voxels(msd, bad):
    p = msd / "imagesTr" / "case1.nii.gz"
    arr, aff = load_volume(p)
    arr[3, 4, 5] = bad
    save_nifti(arr, aff, p)
    only_fault(validate(msd), "case1.nii.gz", "1 NaN/Inf voxel(s)")
    with pytest.raises(DataError, match="NaN/Inf"):
        load_volume(p)


def test_shape_mismatch(nnunet):
    p = nnunet / "labelsTr" / "case0.nii.gz"
    lab, aff = load_volume(p, "label")
    save_nifti(lab[:-2].astype(np.uint8), aff, p)
    only_fault(validate(nnunet), "case0.nii.gz", "shape (10, 12, 12) differs from image (12, 12, 12)")


def test_affine_mismatch(nnunet):
    p = nnunet / "labelsTr" / "case0.nii.gz"
    lab, aff = load_volume(p, "label")
    save_nifti(lab.astype(np.uint8), np.diag([1.5, 1.5, 2.5, 1.0]), p)
    only_fault(validate(nnunet), "case0.nii.gz", "affine/spacing differs")


def test_affine_within_tolerance_accepted(nnunet):
    p = nnunet / "labelsTr" / "case0.nii.gz"
    lab, aff = load_volume(p, "label")
    aff = aff.copy()
    aff[0, 3] += 1e-5
    save_nifti(lab.astype(np.uint8), aff, p)
    assert validate(nnunet).ok


def test_label_values_not_in_label_map(nnunet):
    p = nnunet / "labelsTr" / "case1.nii.gz"
    lab, aff = load_volume(p, "label")
    lab[0, 0, 0] = 9
    save_nifti(lab.astype(np.uint8), aff, p)
    only_fault(validate(nnunet), "case1.nii.gz", "label values [9] not in the label map")


def test_non_binary_mask(atlas):
    p = atlas / "case0" / "segmentations" / "liver.nii.gz"
    m, aff = load_volume(p, "mask")
    save_nifti((m * 2).astype(np.uint8), aff, p)
    only_fault(validate(atlas), "liver.nii.gz", "non-binary mask")
    with pytest.raises(DataError, match="not binary"):
        load_volume(p, "mask")


def test_empty_mask_is_a_warning(atlas, capsys):
    p = atlas / "case1" / "segmentations" / "spleen.nii.gz"
    save_nifti(np.zeros((S, S, S), np.uint8), AFF, p)
    rep = validate(atlas)
    assert rep.ok
    assert faults(rep, "warning") == [("spleen.nii.gz", "empty mask (spleen)")]
    assert cli_check([str(atlas)]) == 0
    assert f"WARNING {p}: empty mask (spleen)" in capsys.readouterr().out


# ------------------------------------------------------------------ dataset-level faults

def test_duplicate_case_ids_msd(msd):
    js = msd / "dataset.json"
    meta = json.loads(js.read_text())
    meta["training"].append(dict(meta["training"][0]))
    js.write_text(json.dumps(meta))
    only_fault(validate(msd), "case0.nii.gz", "duplicate case id 'case0'")


def test_duplicate_case_ids_csv(tmp_path, atlas):
    p = write_csv(read_dataset(atlas), tmp_path / "c" / "list.csv", copy_files=True)
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines + [lines[1]]) + "\n")
    assert "duplicate case id 'case0'" in validate(p).format()


def test_invalid_json(nnunet):
    (nnunet / "dataset.json").write_text('{"labels": {"background": 0,')
    rep = validate(nnunet)
    only_fault(rep, "dataset.json", "invalid JSON")
    assert rep.layout == "nnunet" or rep.layout is None


@pytest.mark.parametrize("key", ["labels", "channel_names"])
def test_missing_key_nnunet(nnunet, key):
    js = nnunet / "dataset.json"
    meta = json.loads(js.read_text())
    del meta[key]
    js.write_text(json.dumps(meta))
    only_fault(validate(nnunet, layout="nnunet"), "dataset.json", f"missing key(s) '{key}'")


def test_missing_key_msd(msd):
    js = msd / "dataset.json"
    meta = json.loads(js.read_text())
    del meta["training"]
    js.write_text(json.dumps(meta))
    only_fault(validate(msd, layout="msd"), "dataset.json", "missing key(s) 'training'")


def test_unrecognised_layout(tmp_path):
    (tmp_path / "x").mkdir()
    rep = validate(tmp_path / "x")
    assert not rep.ok and "unrecognised dataset layout" in rep.format()


# ------------------------------------------------------------------ the command line

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "transfer3d", "check", *map(str, args)], capture_output=True, text=True)


def test_cli_exit_1_names_file_and_fault(nnunet):
    p = nnunet / "labelsTr" / "case0.nii.gz"
    p.write_bytes(p.read_bytes()[:100])
    r = _cli(nnunet, "--workers", "2")
    assert r.returncode == 1, r.stderr
    assert f"ERROR {p}: truncated gzip stream" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("FAILED: 2 case(s) checked")


def test_cli_json(nnunet):
    (nnunet / "imagesTr" / "case1_0000.nii.gz").unlink()
    r = _cli(nnunet, "--json")
    assert r.returncode == 1
    rep = json.loads(r.stdout)
    assert rep["n_errors"] == 1 and rep["problems"][0]["fault"] == "missing file"
    assert rep["problems"][0]["case"] == "case1"


def test_cli_exit_0_on_clean_synthetic_dataset(tmp_path):
    try:
        from transfer3d.data.synth import write_atlas
    except ImportError:
        pytest.skip("transfer3d.data.synth not available")
    write_atlas(tmp_path / "synth", 2, seed=0, size=32, workers=1)
    r = _cli(tmp_path / "synth")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: 2 case(s) checked" in r.stdout


def test_cli_exit_0_on_clean_dataset(atlas):
    r = _cli(atlas)
    assert r.returncode == 0 and r.stdout.startswith("OK: 2 case(s)"), r.stdout + r.stderr


# ------------------------------------------------------------------ MSD multi-modal 4D images

def _msd_multimodal(root: Path, channels: int = 2) -> Path:
    for i in range(2):
        img = np.random.default_rng(i).normal(size=(S, S, S, channels)).astype(np.float32)
        save_nifti(img, AFF, root / "imagesTr" / f"br{i}.nii.gz")
        save_nifti(_sphere((6, 6, 6), 3), AFF, root / "labelsTr" / f"br{i}.nii.gz")
    meta = {"name": "mm", "modality": {str(k): f"MR{k}" for k in range(channels)},
            "labels": {"0": "background", "1": "tumour"}, "numTraining": 2,
            "training": [{"image": f"./imagesTr/br{i}.nii.gz", "label": f"./labelsTr/br{i}.nii.gz"} for i in range(2)]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_multimodal_4d_accepted(tmp_path):
    root = _msd_multimodal(tmp_path / "mm")
    rep = validate(root)
    assert rep.ok and not rep.problems, rep.format()
    assert load_volume(root / "imagesTr" / "br0.nii.gz", channels=2)[0].shape == (S, S, S, 2)


def test_msd_multimodal_wrong_channel_count(tmp_path):
    root = _msd_multimodal(tmp_path / "mm")
    save_nifti(np.zeros((S, S, S), np.float32), AFF, root / "imagesTr" / "br1.nii.gz")
    only_fault(validate(root), "br1.nii.gz", "has 1 channel(s), the dataset declares 2")


def test_num_training_mismatch_is_a_warning(msd):
    js = msd / "dataset.json"
    meta = json.loads(js.read_text())
    meta["numTraining"] = 5
    js.write_text(json.dumps(meta))
    rep = validate(msd)
    assert rep.ok and faults(rep, "warning") == [("dataset.json", "numTraining is 5 but 2 case(s) were found")]
