"""Speed of the transfer3d training engine against plain loops, measured in the same run.

    .venv/bin/python benchmarks/bench_train.py [--steps 40] [--repeats 3] [--size 32] [--compile] [--device cpu|cuda]

Prints (1) the engine's per-step overhead against a bare PyTorch loop on the same model, data and
precision, (2) per-step speed of engine precision/layout options against a plain fp32 MONAI loop, and
(3) the final Dice of the fastest engine option and of the fp32 MONAI loop on the same short task.
Per-step times are medians over the steps after a warm-up, and the ratio is the median over repeats.
Timings depend on the machine and on what else runs on it.

With `--device cuda` everything runs on the GPU; the engine's options add fp16 autocast with loss scaling
(GradScaler), the bare loops an fp16 loop with a GradScaler, and every timed step ends with a
synchronisation so that per-step times are real.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch.utils.data import DataLoader

from transfer3d.train import Trainer, TrainConfig, dice_validator


def spheres(n: int, size: int, seed: int) -> list[dict]:
    "Noisy volumes with one bright sphere each; label 1 inside the sphere."
    g = torch.Generator().manual_seed(seed)
    zz, yy, xx = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij")
    out = []
    for _ in range(n):
        c = torch.randint(size // 4, 3 * size // 4, (3,), generator=g).float()
        r = size / 8 + torch.rand(1, generator=g).item() * size / 6
        lab = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r**2).long()
        img = lab.float() * 0.8 + 0.35 * torch.randn(lab.shape, generator=g)
        out.append({"image": img[None], "label": lab[None]})
    return out


def make_net(channels) -> torch.nn.Module:
    torch.manual_seed(0)
    # BatchNorm keeps the channels_last_3d layout through the network; InstanceNorm drops it
    return UNet(3, 1, 2, channels, (2,) * (len(channels) - 1), num_res_units=1, norm="batch")


def plain_loop(data, steps, channels, amp="none", seed=0, device="cpu"):
    "A plain MONAI training loop (DataLoader, UNet, DiceCELoss, AdamW): per-step times and the net."
    torch.manual_seed(seed)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    net = make_net(channels).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    loader = DataLoader(data, batch_size=2, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed),
                        pin_memory=cuda)
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    times, step = [], 0
    net.train()
    while step < steps:
        for batch in loader:
            t = time.perf_counter()
            x, y = batch["image"].to(dev, non_blocking=True), batch["label"].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=dtype, enabled=amp != "none"):
                pred = net(x)
            loss = loss_fn(pred.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if step == steps:
                break
    return times, net


def engine(data, steps, channels, **kw):
    "The transfer3d Trainer on the same task: per-step times (data loading included) and the net."
    net = make_net(channels)
    stamps = []
    device = kw.pop("device", "cpu")
    cuda = torch.device(device).type == "cuda"
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-3, weight_decay=1e-5, log_every=steps, progress=False,
                      tensorboard=False, out_dir=tempfile.mkdtemp(prefix="bench_train_"), deterministic=False,
                      num_threads=torch.get_num_threads(), device=device, **kw)

    def stamp(t):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    tr = Trainer(net, data, DiceCELoss(to_onehot_y=True, softmax=True), cfg, callbacks=[stamp])
    t0 = time.perf_counter()
    tr.fit(resume=False)
    times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
    return times, net


def med(times, warm=3):
    return statistics.median(times[warm:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--dice-steps", type=int, default=120)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow first steps)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    a = ap.parse_args(argv)
    ch = tuple(a.channels)
    dev = a.device
    cuda = torch.device(dev).type == "cuda"
    data = spheres(16, a.size, seed=0)
    where = (f"GPU {torch.cuda.get_device_name(torch.device(dev))}" if cuda else
             f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {where}, "
          f"input {a.size}^3, UNet channels {ch}, batch 2")

    options = {"engine fp32": {}, "engine fp32+channels_last": {"channels_last": True},
               "engine bf16": {"amp": "bf16"}, "engine bf16+channels_last": {"amp": "bf16", "channels_last": True}}
    if cuda:
        options["engine fp16"] = {"amp": "fp16"}
        options["engine fp16+channels_last"] = {"amp": "fp16", "channels_last": True}
    if a.compile:
        options["engine fp32+compile"] = {"compile": True}
    bare_fp32, bare_bf16, bare_fp16 = [], [], []
    per_opt: dict[str, list[float]] = {k: [] for k in options}
    if cuda:  # untimed warm-up: CUDA context, cuDNN plans
        plain_loop(data, 4, ch, device=dev)
    for r in range(a.repeats):  # interleaved, so load from other processes hits every variant alike
        bare_fp32.append(med(plain_loop(data, a.steps, ch, device=dev)[0]))
        bare_bf16.append(med(plain_loop(data, a.steps, ch, amp="bf16", device=dev)[0]))
        if cuda:
            bare_fp16.append(med(plain_loop(data, a.steps, ch, amp="fp16", device=dev)[0]))
        for name, kw in options.items():
            warm = 8 if kw.get("compile") else 3
            per_opt[name].append(med(engine(data, a.steps + warm, ch, device=dev, **kw)[0], warm))
        print(f"  repeat {r + 1}/{a.repeats} done", flush=True)

    def ratio(xs, ys):  # median over repeats of the per-repeat ratio
        return statistics.median(x / y for x, y in zip(xs, ys))

    print("\n(1) engine overhead vs a bare PyTorch loop, same model/data/precision (per-step median)")
    print(f"  fp32: bare {statistics.median(bare_fp32) * 1e3:7.1f} ms  engine {statistics.median(per_opt['engine fp32']) * 1e3:7.1f} ms"
          f"  overhead {100 * (ratio(per_opt['engine fp32'], bare_fp32) - 1):+.1f} %")
    print(f"  bf16: bare {statistics.median(bare_bf16) * 1e3:7.1f} ms  engine {statistics.median(per_opt['engine bf16']) * 1e3:7.1f} ms"
          f"  overhead {100 * (ratio(per_opt['engine bf16'], bare_bf16) - 1):+.1f} %")
    if bare_fp16:
        print(f"  fp16: bare {statistics.median(bare_fp16) * 1e3:7.1f} ms  engine {statistics.median(per_opt['engine fp16']) * 1e3:7.1f} ms"
              f"  overhead {100 * (ratio(per_opt['engine fp16'], bare_fp16) - 1):+.1f} %")
        print(f"  bare-loop speed-up vs bare fp32: bf16 x{ratio(bare_fp32, bare_bf16):.2f}, fp16 x{ratio(bare_fp32, bare_fp16):.2f}")
    print("\n(2) speed-up per step vs the plain fp32 MONAI loop (>1 is faster)")
    for name, ts in per_opt.items():
        print(f"  {name:28s} {statistics.median(ts) * 1e3:7.1f} ms/step  x{ratio(bare_fp32, ts):.2f}")
    best = min(per_opt, key=lambda k: statistics.median(per_opt[k]))

    print(f"\n(3) final Dice after {a.dice_steps} steps on held-out spheres: plain fp32 MONAI loop vs {best}")
    val = dice_validator(spheres(8, a.size, seed=1), num_classes=2)
    _, net0 = plain_loop(data, a.dice_steps, ch, device=dev)
    _, net1 = engine(data, a.dice_steps, ch, device=dev, **options[best])
    for n in (net0, net1):
        n.eval()
    amp = options[best].get("amp", "none")
    with torch.no_grad():
        d0 = val(net0)["dice"]
        with torch.autocast(torch.device(dev).type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                            enabled=amp != "none"):
            d1 = val(net1)["dice"]
    print(f"  plain fp32 {d0:.4f}   {best} {d1:.4f}   difference {d1 - d0:+.4f}")


if __name__ == "__main__":
    main()
