"""Speed of the synthetic atlas generator (transfer3d.data.synth).

    .venv/bin/python benchmarks/bench_synth.py [--sizes 64 96 128] [--repeat 5]

Prints seconds per subject for `make_subject` (one core: numpy/scipy.ndimage run single-threaded here),
the cost of writing one subject's NIfTI files, `write_atlas` throughput with 1 and N workers, and, as a
baseline in the same run, one MONAI `Rand3DElasticd` augmentation of a 96^3 image + label (the cost a
training loop pays per sample anyway) with the ratio between the two. Target: a 96^3 subject <= 0.5 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from transfer3d.core import cpu_count
from transfer3d.data.synth import make_subject, save_subject, write_atlas


def timeit(fn, repeat: int) -> tuple[float, float]:
    "Median wall and median CPU seconds of `fn()` (CPU time is robust when other jobs share the cores)."
    fn()  # warm-up (imports, allocator)
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def monai_elastic_96(repeat: int) -> float | None:
    try:
        import torch
        from monai.transforms import Rand3DElasticd
    except ImportError:
        return None
    torch.set_num_threads(1)
    s = make_subject(0, size=96)
    d = {"image": s.image[None], "label": s.label[None].astype(np.float32)}
    t = Rand3DElasticd(keys=["image", "label"], sigma_range=(5, 8), magnitude_range=(100, 200), prob=1.0,
                       mode=("bilinear", "nearest"), padding_mode="border")
    t.set_random_state(0)
    return timeit(lambda: t(d), repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--n", type=int, default=8, help="subjects for the write_atlas throughput")
    a = ap.parse_args()

    print(f"load average {os.getloadavg()[0]:.1f} on {cpu_count()} cores")
    print(f"{'what':<34}{'size':>6}{'wall s':>11}{'cpu s':>9}")
    res = {}
    for size in a.sizes:
        for variant in ("ct", "shift", "mr"):
            seeds = iter(range(10_000))
            med, mn = timeit(lambda: make_subject(next(seeds), size=size, variant=variant), a.repeat)
            res[(size, variant)] = mn
            print(f"{'make_subject ' + variant:<34}{size:>6}{med:>11.3f}{mn:>9.3f}")
    s = make_subject(0, size=96)
    with tempfile.TemporaryDirectory() as d:
        med, mn = timeit(lambda: save_subject(s, d), a.repeat)
        print(f"{'save_subject (27 NIfTI files)':<34}{96:>6}{med:>11.3f}{mn:>9.3f}")
        for w in sorted({1, cpu_count()}):
            t = time.perf_counter()
            write_atlas(os.path.join(d, f"w{w}"), n=a.n, size=96, workers=w, progress=False)
            dt = time.perf_counter() - t
            print(f"{f'write_atlas n={a.n} workers={w}':<34}{96:>6}{dt / a.n:>11.3f}{'':>9}  (s per subject, incl. files)")
    base = monai_elastic_96(a.repeat)  # (wall, cpu)
    ct96 = res.get((96, "ct"))
    if base is not None:
        print(f"{'baseline: MONAI Rand3DElasticd':<34}{96:>6}{base[0]:>11.3f}{base[1]:>9.3f}")
        if ct96:
            print(f"\nmake_subject(96, ct) = {ct96:.3f} CPU s per subject "
                  f"({ct96 / base[1]:.2f}x one MONAI elastic augmentation of the same volume, CPU time)")
    if ct96:
        print(f"target <= 0.5 s per 96^3 subject on one core: {'met' if ct96 <= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
