"""The MONAI pipeline on a tiny dataset in every layout: shapes, labels, caching, determinism, subsets."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transfer3d.core import DataError, ParamsError
from transfer3d.data.pipeline import (
    PipelineConfig, make_dataset, make_loader, read_split, split_cases, subset, write_split, write_splits,
)
from transfer3d.data.sources import read_dataset, save_nifti, write_csv, write_msd, write_nnunet

S = 40  # synthetic volumes of 40^3 voxels over a 400 mm field of view: 10 mm voxels
AFF = np.diag([1.5, 1.5, 1.5, 1.0])
CFG = PipelineConfig(roi_size=(16, 16, 16), spacing=(12.0, 12.0, 12.0), num_samples=2)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    "The same synthetic cases (partially annotated) in all four layouts."
    from transfer3d.data.synth import write_atlas

    root = tmp_path_factory.mktemp("layouts")
    write_atlas(root / "atlas", 3, seed=0, size=S, partial=0.7, workers=1, progress=False)
    atlas = read_dataset(root / "atlas")
    write_msd(atlas, root / "msd")
    write_nnunet(atlas, root / "nnunet")
    write_csv(atlas, root / "csv" / "manifest.csv", copy_files=True)
    return {lay: read_dataset(root / lay) for lay in ("atlas", "msd", "nnunet", "csv")}


@pytest.mark.parametrize("layout", ["atlas", "msd", "nnunet", "csv"])
def test_batches_from_every_layout(datasets, layout):
    src = datasets[layout]
    assert src.layout == layout
    batch = next(iter(make_loader(make_dataset(src, CFG), batch_size=2, seed=0)))
    n_ids = max(src.labels.values()) + 1
    assert n_ids == 26  # the synthetic label map: background, 19 organs, 6 lesion classes
    assert batch["annotated"][:, 1:].sum(1).lt(25).all()  # partial: some classes unannotated in each case
    assert tuple(batch["image"].shape) == (4, 1, 16, 16, 16)
    assert tuple(batch["label"].shape) == (4, 1, 16, 16, 16)
    assert tuple(batch["annotated"].shape) == (4, n_ids)
    assert batch["image"].dtype == torch.float32
    assert -0.2 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.3  # window + intensity aug
    whole = make_dataset(src, CFG, train=False)[0]["image"]
    assert float(whole.min()) == 0.0 and float(whole.max()) == 1.0  # the HU window maps to [0, 1]
    assert set(torch.unique(batch["label"]).tolist()) <= set(src.labels.values())


def test_layouts_give_identical_batches(datasets):
    b = {lay: next(iter(make_loader(make_dataset(s, CFG), batch_size=3, seed=5))) for lay, s in datasets.items()}
    for lay in ("msd", "nnunet", "csv"):
        assert torch.equal(b["atlas"]["image"], b[lay]["image"]), lay
        assert torch.equal(b["atlas"]["label"], b[lay]["label"]), lay


def test_multilabel_and_partial_annotation(datasets):
    src = datasets["atlas"]
    cfg = CFG.model_copy(update={"label_mode": "multilabel", "class_balanced": True})
    ds = make_dataset(src, cfg, train=False)
    k = len(src.classes)
    for i, case in enumerate(src.cases):
        item = ds[i]
        assert item["label"].shape[0] == k
        vec = item["annotated"]
        assert vec.tolist() == src.annotated_vector(case).tolist() and vec[0] == 1
        missing = [c for c in src.classes if c not in src.annotated(case)]
        assert missing  # partial=0.7 leaves some organs unannotated
        for c in missing:  # unannotated class: vector 0 and an empty channel
            assert vec[src.labels[c]] == 0 and item["label"][src.labels[c] - 1].sum() == 0
        assert any(item["label"][src.labels[c] - 1].sum() > 0 for c in src.annotated(case))
    batch = next(iter(make_loader(make_dataset(src, cfg), batch_size=2, seed=0)))
    assert tuple(batch["label"].shape) == (4, k, 16, 16, 16) and "crop_label" not in batch
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 1}


def test_positive_only_crops_contain_foreground(datasets):
    for balanced in (False, True):
        cfg = CFG.model_copy(update={"pos_neg": (1.0, 0.0), "class_balanced": balanced, "num_samples": 4, "augment": False})
        ds = make_dataset(datasets["nnunet"], cfg)
        for i in range(len(ds)):
            assert all(s["label"].sum() > 0 for s in ds[i])


def test_window_spacing_orientation(tmp_path):
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])  # LPS-oriented file: pipeline must give RAS
    vol = np.zeros((20, 20, 20), np.float32)
    vol[:10] = 250.0  # first half of axis 0 bright (in LPS that is the right side)
    save_nifti(vol, lps, tmp_path / "img.nii.gz")
    save_nifti((vol > 0).astype(np.uint8), lps, tmp_path / "lab.nii.gz")
    items = [{"id": "x", "image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}]
    cfg = PipelineConfig(window=(-250, 250), spacing=(4.0, 4.0, 4.0), crop_foreground=False, roi_size=(8, 8, 8))
    out = make_dataset(items, cfg, train=False, labels={"background": 0, "bright": 1})[0]
    img = out["image"]
    assert tuple(img.shape) == (1, 10, 10, 10)
    assert np.allclose(np.diag(img.affine.numpy())[:3], [4, 4, 4])  # RAS, resampled
    assert float(img[0, -1].mean()) == pytest.approx(1.0) and float(img[0, 0].mean()) == pytest.approx(0.5)
    assert out["label"][0, -1].all() and not out["label"][0, 0].any()


def test_mr_percentile_normalisation(tmp_path):
    vol = np.random.default_rng(0).gamma(2, 100, (16, 16, 16)).astype(np.float32)
    save_nifti(vol, AFF, tmp_path / "mr.nii.gz")
    cfg = PipelineConfig(modality="mr", spacing=None, crop_foreground=False, roi_size=(8, 8, 8), task="classification")
    img = make_dataset([{"image": str(tmp_path / "mr.nii.gz"), "target": 1}], cfg, train=False)[0]["image"]
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0 and tuple(img.shape) == (1, 8, 8, 8)


@pytest.mark.parametrize("cache", ["none", "disk", "memory"])
def test_bad_file_raises_data_error_naming_it(datasets, tmp_path, cache):
    import shutil
    shutil.copytree(datasets["msd"].root, tmp_path / "msd")
    src = read_dataset(tmp_path / "msd")
    bad = src.cases[1].image[0]
    save_nifti(np.zeros((S, S), np.float32), AFF, bad)  # a 2D slice: MONAI would accept it
    with pytest.raises(DataError) as e:
        ds = make_dataset(src, CFG, cache=cache, cache_dir=tmp_path / "cache")
        ds[1]
    assert e.value.path == str(bad) and "not 3D" in e.value.fault


def test_disk_cache_keyed_by_deterministic_config(datasets, tmp_path):
    src = datasets["atlas"]
    d1 = make_dataset(src, CFG, cache="disk", cache_dir=tmp_path)
    d2 = make_dataset(src, CFG.model_copy(update={"augment": False, "num_samples": 1, "pos_neg": (1, 1)}),
                      cache="disk", cache_dir=tmp_path)
    d3 = make_dataset(src, CFG.model_copy(update={"window": (-100.0, 100.0)}), cache="disk", cache_dir=tmp_path)
    d4 = make_dataset(src, CFG.model_copy(update={"label_mode": "multilabel"}), cache="disk", cache_dir=tmp_path)
    assert d1.cache_dir == d2.cache_dir
    assert len({d1.cache_dir, d3.cache_dir, d4.cache_dir}) == 3
    a = d1[0]
    assert len(list(d1.cache_dir.glob("*.pt"))) == 1
    b = make_dataset(src, CFG, cache="disk", cache_dir=tmp_path, train=False)[0]  # same cache, no random crop
    assert len(list(d1.cache_dir.glob("*.pt"))) == 1
    assert tuple(a[0]["image"].shape) == (1, 16, 16, 16) and b["image"].shape[1:] != (16, 16, 16)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_deterministic_per_seed(datasets, workers):
    def batches(seed):
        dl = make_loader(make_dataset(datasets["atlas"], CFG), batch_size=1, seed=seed, num_workers=workers)
        return [b["image"] for b in dl]

    a, b, c = batches(3), batches(3), batches(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_classification_csv(datasets, tmp_path):
    rows = ["id,image,target"] + [f"c{i},{c.image[0]},{i % 2}" for i, c in enumerate(datasets["atlas"].cases)]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    src = read_dataset(tmp_path / "cls.csv")
    assert src.task == "classification" and src.classes == ["class_0", "class_1"]
    batch = next(iter(make_loader(make_dataset(src, PipelineConfig(roi_size=(12, 12, 12), spacing=(12.0, 12.0, 12.0))), batch_size=3, shuffle=False)))
    assert tuple(batch["image"].shape) == (3, 1, 12, 12, 12)
    assert batch["target"].tolist() == [0, 1, 0] and "label" not in batch


# ------------------------------------------------------------------ subsets and splits

@pytest.mark.parametrize("seed", range(10))
def test_subsets_are_nested(seed):
    ids = [f"s{i:04d}" for i in np.random.default_rng(seed).permutation(100)]
    prev: list = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        cur = subset(ids, n, seed)
        assert len(cur) == len(set(cur)) == n
        assert cur[: len(prev)] == prev  # subset(n) is a prefix of subset(2n)
        prev = cur
    assert subset(ids, 10, seed) == subset(sorted(ids), 10, seed)


def test_subset_accepts_cases_and_dicts(datasets):
    src = datasets["atlas"]
    assert [c.id for c in subset(src.cases, 2, 1)] == subset(src.ids, 2, 1)
    assert [d["id"] for d in subset(src.items(), 2, 1)] == subset(src.ids, 2, 1)
    with pytest.raises(ParamsError):
        subset(src.ids, 4)


def test_splits_disjoint_and_roundtrip(tmp_path):
    ids = [f"c{i}" for i in range(50)]
    sp = split_cases(ids, val=5, test=0.2, seed=2)
    assert [len(sp[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    assert set().union(*map(set, sp.values())) == set(ids)
    assert sum(map(len, sp.values())) == len(ids)
    paths = write_splits(sp, tmp_path, sizes=(5, 10))
    assert read_split(paths["train"], known=ids) == sp["train"]
    assert set(read_split(paths["train_5"])) < set(read_split(paths["train_10"]))
    write_split(["a", "b", "a"], tmp_path / "dup.txt")
    with pytest.raises(DataError, match="repeated"):
        read_split(tmp_path / "dup.txt")
    with pytest.raises(DataError, match="not in the dataset"):
        read_split(paths["train"], known=ids[:3])


def test_msd_multimodal_batches(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        save_nifti(rng.normal(size=(20, 20, 20, 3)).astype(np.float32), AFF, tmp_path / "imagesTr" / f"b{i}.nii.gz")
        lab = np.zeros((20, 20, 20), np.uint8)
        lab[5:12, 5:12, 5:12] = 1
        save_nifti(lab, AFF, tmp_path / "labelsTr" / f"b{i}.nii.gz")
    meta = {"modality": {"0": "FLAIR", "1": "T1", "2": "T2"}, "labels": {"0": "background", "1": "tumour"},
            "training": [{"image": f"./imagesTr/b{i}.nii.gz", "label": f"./labelsTr/b{i}.nii.gz"} for i in range(2)]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    src = read_dataset(tmp_path)
    cfg = PipelineConfig(modality="mr", spacing=None, crop_foreground=False, roi_size=(8, 8, 8), num_samples=1)
    batch = next(iter(make_loader(make_dataset(src, cfg), batch_size=2)))
    assert tuple(batch["image"].shape) == (2, 3, 8, 8, 8) and tuple(batch["label"].shape) == (2, 1, 8, 8, 8)
