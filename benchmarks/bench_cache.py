"""How long training waits for data, epoch 1 vs epoch 2, with and without transfer3d's caches.

For each cache mode ('none' = plain MONAI Dataset, 'disk' = PersistentDataset keyed by the config digest,
'memory' = CacheDataset) this trains a small MONAI UNet for two epochs on a synthetic AbdomenAtlas-style
dataset and records, per step, the time spent waiting for the next batch and the time of the step itself.
Target: in epoch 2 the cached modes wait <= 5 % of the step time.

    .venv/bin/python benchmarks/bench_cache.py            # defaults: 8 cases of 128^3 -> 3 mm, roi 64^3
    .venv/bin/python benchmarks/bench_cache.py --cases 4 --size 96 --roi 48 --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def make_data(out: Path, n: int, size: int) -> Path:
    "A synthetic AbdomenAtlas-style dataset (ct.nii.gz + one mask per class, 25 classes)."
    from transfer3d.data.synth import write_atlas

    write_atlas(out, n, seed=0, size=size, progress=False)
    return out


def run(mode: str, src, cfg, cache_root: Path, epochs: int, batch: int, seed: int) -> list[dict]:
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from transfer3d.data.pipeline import make_dataset, make_loader

    torch.manual_seed(seed)
    n_out = max(src.labels.values()) + 1
    net = UNet(3, 1, n_out, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    t_build = time.perf_counter()
    ds = make_dataset(src, cfg, cache=mode, cache_dir=cache_root)
    t_build = time.perf_counter() - t_build
    dl = make_loader(ds, batch_size=batch, seed=seed)
    rows = []
    for ep in range(1, epochs + 1):
        wait = step = 0.0
        n = 0
        t = time.perf_counter()
        for b in dl:
            t1 = time.perf_counter()
            wait += t1 - t
            opt.zero_grad()
            loss = loss_fn(net(b["image"].as_tensor()), b["label"].as_tensor())
            loss.backward()
            opt.step()
            t = time.perf_counter()
            step += t - t1
            n += 1
        if ep == 1 and mode == "memory":
            wait += t_build  # CacheDataset does epoch 1's preprocessing in its constructor
        rows.append({"mode": mode, "epoch": ep, "steps": n, "wait": wait, "step": step})
        print(f"  .. {mode} epoch {ep}: wait {wait:.2f} s, step {step:.2f} s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="voxels per axis of each synthetic volume (400 mm field of view)")
    p.add_argument("--spacing", type=float, default=3.0, help="pipeline target spacing in mm")
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--samples", type=int, default=2, help="crops per volume")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transfer3d.data.pipeline import PipelineConfig
    from transfer3d.data.sources import read_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        src = read_dataset(make_data(work / "atlas", a.cases, a.size))
        cfg = PipelineConfig(roi_size=(a.roi,) * 3, num_samples=a.samples, spacing=(a.spacing,) * 3)
        print(f"{len(src)} cases of {a.size}^3 resampled to {a.spacing} mm, {len(src.classes)} classes, roi {a.roi}^3, batch {a.batch} x "
              f"{a.samples} crops, torch threads {torch.get_num_threads()}, workers 0 (data time on the critical path)", flush=True)
        rows = []
        for mode in ("none", "disk", "memory"):
            rows += run(mode, src, cfg, work / "cache", a.epochs, a.batch, seed=0)
        print(f"\n{'dataset':28s} {'epoch':>5s} {'steps':>5s} {'data wait s':>11s} {'step s':>8s} {'wait/step':>9s}")
        names = {"none": "monai Dataset (uncached)", "disk": "PersistentDataset (disk)", "memory": "CacheDataset (memory)"}
        for r in rows:
            print(f"{names[r['mode']]:28s} {r['epoch']:5d} {r['steps']:5d} {r['wait']:11.2f} {r['step']:8.2f} "
                  f"{100 * r['wait'] / r['step']:8.1f}%")
        last = {r["mode"]: r for r in rows if r["epoch"] == a.epochs}
        print(f"\nepoch {a.epochs} data wait vs uncached: disk {last['disk']['wait'] / last['none']['wait']:.3f}x, "
              f"memory {last['memory']['wait'] / last['none']['wait']:.3f}x")
        for m in ("disk", "memory"):
            frac = last[m]["wait"] / last[m]["step"]
            print(f"{names[m]}: epoch {a.epochs} waits {100 * frac:.1f}% of step time -> "
                  f"{'meets' if frac <= 0.05 else 'MISSES'} the <= 5% target")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
