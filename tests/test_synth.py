"""The synthetic atlas end to end: `transfer3d synth` in a subprocess, files, determinism, annotation, lesions."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from transfer3d.data.synth import (CLASSES, LABELS, TUMOR_CLASSES, TUMOR_HOSTS, lesion_crops, make_subject,
                                   write_atlas)

SIZE = 48


def synth(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "transfer3d", "synth", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    synth(out, "--n", 8, "--seed", 0, "--size", SIZE, "--tumors", 1.0)
    return out


def test_cli_writes_readable_atlas(atlas):
    man = json.loads((atlas / "manifest.json").read_text())
    assert len(man["subjects"]) == 8 and man["labels"] == LABELS
    assert (atlas / "manifest.csv").read_text().count("\n") == 9
    for r in man["subjects"]:
        img = nib.load(atlas / r["image"])
        assert img.shape == (SIZE,) * 3 and nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.asarray(img.dataobj).min() >= -1024
        lab = nib.load(atlas / r["label"])
        assert lab.get_data_dtype() == np.uint8 and np.allclose(lab.affine, img.affine)
        assert set(r["segmentations"]) == set(CLASSES + TUMOR_CLASSES) == set(r["annotated"])
        for c, f in r["segmentations"].items():
            m = nib.load(atlas / f)
            data = np.asarray(m.dataobj)
            assert m.get_data_dtype() == np.uint8 and data.shape == (SIZE,) * 3, c
            assert np.array_equal(m.affine, img.affine), c
            assert set(np.unique(data)) <= {0, 1}, c
        assert r["variant"] == "ct" and r["modality"] == "ct" and len(r["spacing"]) == 3


def test_tumors_inside_host(atlas):
    man = json.loads((atlas / "manifest.json").read_text())
    seen = set()
    for r in man["subjects"]:
        load = lambda c: np.asarray(nib.load(atlas / r["segmentations"][c]).dataobj).astype(bool)
        for t in TUMOR_CLASSES:
            m = load(t)
            assert m.sum() == 0 or t in r["tumors"], (r["id"], t)
            if m.any():
                seen.add(t)
                host = np.logical_or.reduce([load(h) for h in TUMOR_HOSTS[t]])
                assert not (m & ~host).any(), (r["id"], t)
    assert len(seen) >= 3  # several lesion types appear in 8 subjects


def test_same_seed_same_bytes_other_seed_differs(atlas, tmp_path):
    synth(tmp_path / "b", "--n", 8, "--seed", 0, "--size", SIZE, "--tumors", 1.0, "--workers", 1)
    a, b = files(atlas), files(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]  # workers 1 vs default: identical
    synth(tmp_path / "c", "--n", 2, "--seed", 1, "--size", SIZE, "--tumors", 1.0)
    c = files(tmp_path / "c")
    for k in ("SYN_00000/ct.nii.gz", "SYN_00000/segmentations/liver.nii.gz", "SYN_00001/label.nii.gz"):
        assert c[k] != a[k], k


def test_workers_1_and_2_identical(tmp_path):
    p1 = write_atlas(tmp_path / "w1", n=3, seed=7, size=32, workers=1, partial=0.5)
    p2 = write_atlas(tmp_path / "w2", n=3, seed=7, size=32, workers=2, partial=0.5)
    assert files(p1.parent) == files(p2.parent)


def test_partial_annotation(tmp_path):
    out = tmp_path / "p"
    synth(out, "--n", 4, "--seed", 3, "--size", 32, "--partial", 0.3)
    man = json.loads((out / "manifest.json").read_text())
    for r in man["subjects"]:
        organs = [c for c in r["annotated"] if c in CLASSES]
        assert len(organs) == round(0.3 * len(CLASSES)) < len(CLASSES)
        assert set(r["unannotated"]) == set(CLASSES + TUMOR_CLASSES) - set(r["annotated"])
        present = {p.name[: -len(".nii.gz")] for p in (out / r["id"] / "segmentations").glob("*.nii.gz")}
        assert present == set(r["annotated"])
        lab = np.asarray(nib.load(out / r["label"]).dataobj)
        assert set(np.unique(lab)) <= {0} | {LABELS[c] for c in r["annotated"]}
    # rewriting the same folder fully annotated, then partially again, leaves no stale masks behind
    write_atlas(out, n=4, seed=3, size=32, workers=1)
    write_atlas(out, n=4, seed=3, size=32, workers=1, partial=0.3)
    r = json.loads((out / "manifest.json").read_text())["subjects"][0]
    assert {p.name[:-7] for p in (out / r["id"] / "segmentations").glob("*.nii.gz")} == set(r["annotated"])


def test_variants_share_anatomy_and_mr_is_recorded(tmp_path):
    ct, mr = make_subject(5, size=32), make_subject(5, size=32, variant="mr")
    assert np.array_equal(ct.label, mr.label) and not np.array_equal(ct.image, mr.image)
    synth(tmp_path / "mr", "--n", 1, "--size", 32, "--variant", "mr")
    r = json.loads((tmp_path / "mr" / "manifest.json").read_text())["subjects"][0]
    assert r["modality"] == "mr" and r["image"].endswith("ct.nii.gz")
    assert nib.load(tmp_path / "mr" / r["image"]).header["intent_name"].tobytes().rstrip(b"\0") == b"mr"


def test_lesion_crops_from_folder(atlas, tmp_path):
    crops = lesion_crops(atlas, size=16, out_dir=tmp_path / "crops")
    assert len(crops) > 4 and crops.images.shape[1:] == (16, 16, 16) and set(crops.targets.tolist()) == {0, 1}
    rows = crops.csv.read_text().splitlines()
    assert len(rows) == len(crops) + 1
    name = rows[1].split(",")[1]
    assert nib.load(tmp_path / "crops" / name).shape == (16, 16, 16)


@pytest.mark.parametrize("args, fault", [
    (["--variant", "pet"], "invalid choice"),
    (["--partial", "1.5"], "partial"),
    (["--n", "0"], "n: expected"),
    (["--size", "8"], "size"),
    (["--tumors", "2"], "tumors"),
])
def test_bad_arguments(tmp_path, args, fault):
    r = synth(tmp_path / "x", *args, check=False)
    assert r.returncode == 2 and fault in r.stderr, r.stderr


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    r = synth(tmp_path / "f", "--n", 1, "--size", 32, check=False)
    assert r.returncode == 2 and "not a folder" in r.stderr


def test_crops_bad_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    from transfer3d.core import DataError
    with pytest.raises(DataError, match="manifest"):
        lesion_crops(tmp_path)
