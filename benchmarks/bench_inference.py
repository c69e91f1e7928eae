"""Speed of transfer3d's sliding-window inference and surface metrics, against plain MONAI in the same run.

    .venv/bin/python benchmarks/bench_inference.py [--size 160] [--roi 96] [--overlap 0.25] [--repeats 3]
                                                   [--bf16-repeats 1] [--train-steps 8] [--nsd-size 256]
                                                   [--device cpu|cuda]

Part 1 predicts a `--size`³ volume with a MONAI UNet of realistic width (channels 16..256, two residual
units per level, 3 classes) in `--roi`³ windows, and compares every option of
`transfer3d.evaluate.sliding_window_predict` with MONAI's default call
`sliding_window_inference(x, roi, 1, net, overlap)` in fp32 under `torch.no_grad()` — same network, same
overlap, same input. The network is first trained for `--train-steps` steps on toy data so that its
predictions are not ties of a random network. Reported: median seconds over repeats (configurations are
interleaved so background load hits them alike), speed-up against MONAI, and the mean foreground Dice
between each option's argmax and MONAI's argmax.

Part 2 times `segmentation_metrics` (Dice, NSD at 2 mm, HD95) on a `--nsd-size`³ pair of large shifted
spheres (radius 80 voxels, anisotropic spacing) against MONAI's `compute_surface_dice` +
`compute_hausdorff_distance` on the same pair, and checks that both give the same values.

bf16 autocast only pays on CPUs with native bf16 (AVX-512 BF16 / AMX); elsewhere it is emulated and much
slower, so by default it runs `--bf16-repeats` (1) times. Timings depend on the machine and on what else
runs on it.

With `--device cuda` part 1 trains and runs the network on the GPU: the input starts on the CPU and the
label map ends there (the copies are timed), MONAI's call gets the volume moved to the GPU (windows and
stitching on the GPU), transfer3d's options get the same, plus fp16 autocast and one bf16 option that
keeps the CPU input as is (`sliding_window_predict` then stitches the windows on the CPU). Every option
runs once untimed first (cuDNN picks its kernels), and each timing ends with a synchronisation. Part 2
(surface metrics) is CPU code either way; `--skip-metrics` leaves it out.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from transfer3d.core import cpu_count
from transfer3d.evaluate import _cpu_has_native_bf16, dice, segmentation_metrics, sliding_window_predict


def toy_volume(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    "(1, S, S, S) image and (S, S, S) labels: balls = 1 (bright), boxes = 2 (dark), Gaussian noise."
    rng = np.random.default_rng(seed)
    g = np.indices((size,) * 3, dtype=np.float32)
    lab = np.zeros((size,) * 3, np.int64)
    for cls in (1, 2):
        for _ in range(max(2, size // 24)):
            c = rng.uniform(size * 0.15, size * 0.85, 3)
            r = rng.uniform(size * 0.06, size * 0.14)
            d = g - c[:, None, None, None]
            m = (d ** 2).sum(0) < r * r if cls == 1 else (np.abs(d) < r * 0.8).all(0)
            lab[m] = cls
    img = np.choose(lab, [0.0, 1.0, -1.0]).astype(np.float32) + rng.normal(0, 0.3, lab.shape).astype(np.float32)
    return torch.from_numpy(img)[None], torch.from_numpy(lab)


def make_net(train_steps: int, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    net = UNet(3, 1, 3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2).to(device)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for step in range(train_steps):
        x, y = toy_volume(48, 100 + step)
        x, y = x.to(device), y.to(device)
        loss = torch.nn.functional.cross_entropy(net(x[None]), y[None])
        opt.zero_grad(); loss.backward(); opt.step()
    return net.eval()


def fg_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.squeeze(), b.squeeze()
    return float(np.nanmean([dice((a == c).numpy(), (b == c).numpy()) for c in (1, 2)]))


def timed(fn, sync: bool = False):
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def part1(args) -> None:
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    t, net = timed(lambda: make_net(args.train_steps, device=args.device), sync=cuda)
    if cuda:
        print(f"trained UNet(16..256) for {args.train_steps} steps in {t:.0f} s on {torch.cuda.get_device_name(dev)}; "
              f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    else:
        print(f"trained UNet(16..256) for {args.train_steps} steps in {t:.0f} s; threads={args.threads}; "
              f"CPU native bf16: {_cpu_has_native_bf16()}")
    x, truth = toy_volume(args.size, 0)
    xb = x[None]

    def monai_default():
        with torch.no_grad():
            return sliding_window_inference(xb.to(dev), args.roi, 1, net, overlap=args.overlap)[0].argmax(0).cpu()

    def ours(on_device: bool = True, **kw):
        return lambda: sliding_window_predict(net, x.to(dev) if on_device else x, roi_size=args.roi,
                                              overlap=args.overlap, output="label", device=dev, **kw)[0].cpu()

    configs = {
        "MONAI default (fp32, constant)": (monai_default, args.repeats),
        "ours fp32 constant": (ours(precision="fp32", mode="constant"), args.repeats),
        "ours fp32 gaussian": (ours(precision="fp32"), args.repeats),
        "ours fp32 gaussian channels_last_3d": (ours(precision="fp32", channels_last=True), args.repeats),
        "ours fp32 gaussian sw_batch_size=2": (ours(precision="fp32", sw_batch_size=2), args.repeats),
        "ours bf16 gaussian": (ours(precision="bf16"), args.bf16_repeats),
        "ours bf16 gaussian channels_last_3d": (ours(precision="bf16", channels_last=True), args.bf16_repeats),
    }
    if cuda:
        configs.update({
            "ours bf16 gaussian sw_batch_size=4": (ours(precision="bf16", sw_batch_size=4), args.bf16_repeats),
            "ours fp16 gaussian": (ours(precision="fp16"), args.bf16_repeats),
            "ours fp16 gaussian channels_last_3d": (ours(precision="fp16", channels_last=True), args.bf16_repeats),
            "ours bf16 gaussian, CPU input": (ours(False, precision="bf16"), args.bf16_repeats),
        })
    times: dict[str, list[float]] = {k: [] for k in configs}
    preds: dict[str, torch.Tensor] = {}
    with torch.no_grad():  # warm-up: oneDNN builds its kernels on the first call
        net(torch.zeros(1, 1, args.roi, args.roi, args.roi, device=dev))
    if cuda:  # and cuDNN its plans, per precision and layout
        for fn, _ in configs.values():
            fn()
    for r in range(max(c[1] for c in configs.values())):
        for name, (fn, reps) in configs.items():  # interleaved: background load hits every option alike
            if r < reps:
                t, p = timed(fn, sync=cuda)
                times[name].append(t)
                preds[name] = p
                print(f"  run {r + 1}: {name:<38} {t:7.2f} s", flush=True)
    base = statistics.median(times["MONAI default (fp32, constant)"])
    ref = preds["MONAI default (fp32, constant)"]
    print(f"\nsliding-window inference, {args.size}³ volume, roi {args.roi}³, overlap {args.overlap}, "
          f"median of runs (n shown)")
    same = preds["ours fp32 gaussian"]  # same blending: isolates the effect of precision and layout
    print(f"{'option':<38}{'n':>3}{'seconds':>10}{'speed-up':>10}{'Dice vs MONAI':>15}{'vs fp32 gauss':>15}"
          f"{'vs truth':>10}")
    for name in configs:
        if not times[name]:
            continue
        m = statistics.median(times[name])
        print(f"{name:<38}{len(times[name]):>3}{m:>10.2f}{base / m:>9.2f}x{fg_dice(preds[name], ref):>15.4f}"
              f"{fg_dice(preds[name], same):>15.4f}{fg_dice(preds[name], truth):>10.4f}")
    print("Dice columns: mean over the two foreground classes of the Dice between argmax label maps.")


def part2(args) -> None:
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    n = args.nsd_size
    g = np.ogrid[:n, :n, :n]
    c = n / 2
    a = sum((v - c) ** 2 for v in g) < 80 ** 2
    b = sum((v - o) ** 2 for v, o in zip(g, (c + 3, c - 2, c + 1))) < 78 ** 2
    sp = (0.8, 0.8, 1.5)
    ts = []
    for _ in range(args.repeats):
        t, ours = timed(lambda: segmentation_metrics(a, b, spacing=sp, tolerance_mm=2.0))
        ts.append(t)
    oh = lambda m: torch.from_numpy(np.stack([~m, m]))[None]
    t_m, (nsd_m, hd_m) = timed(lambda: (
        compute_surface_dice(oh(a), oh(b), [2.0], spacing=sp).item(),
        compute_hausdorff_distance(oh(a), oh(b), percentile=95, spacing=sp).item()))
    med = statistics.median(ts)
    print(f"\nsurface metrics on a {n}³ mask pair (spheres r=80/78 voxels, spacing {sp} mm)")
    print(f"{'implementation':<44}{'seconds':>10}{'NSD@2mm':>10}{'HD95 mm':>10}")
    print(f"{'transfer3d segmentation_metrics (Dice+NSD+HD95)':<44}{med:>10.2f}{ours['nsd']:>10.4f}{ours['hd95']:>10.3f}")
    print(f"{'MONAI compute_surface_dice + hausdorff':<44}{t_m:>10.2f}{nsd_m:>10.4f}{hd_m:>10.3f}")
    print(f"speed-up {t_m / med:.1f}x; target <= 2 s: {'met' if med <= 2 else 'NOT met'} ({med:.2f} s, median of {len(ts)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16-repeats", type=int, default=None,
                   help="default: --repeats on CPUs with native bf16, else 1 (0 skips bf16)")
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=cpu_count())
    p.add_argument("--nsd-size", type=int, default=256)
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-metrics", action="store_true")
    p.add_argument("--device", default="cpu", help="where part 1 trains and predicts: cpu (default) or cuda[:N]")
    args = p.parse_args()
    if args.bf16_repeats is None:
        args.bf16_repeats = args.repeats if _cpu_has_native_bf16() or args.device.startswith("cuda") else 1
    if not args.skip_metrics:
        part2(args)
    if not args.skip_inference:
        part1(args)


if __name__ == "__main__":
    main()
