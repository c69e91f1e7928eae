"""Training engine: exact resume, determinism, DDP with gloo, bad checkpoints (transfer3d.train)."""
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from transfer3d.core import WeightsError
from transfer3d.train import Trainer, TrainConfig, load_checkpoint


def items(n=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(1, size, size, size, generator=g),
             "label": torch.randint(0, 2, (1, size, size, size), generator=g)} for _ in range(n)]


def net(seed=123):
    torch.manual_seed(seed)
    # Dropout makes the result depend on torch's global generator, which a resume must restore
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout3d(0.2), nn.Conv3d(4, 2, 1))


def ce(pred, y):
    return nn.functional.cross_entropy(pred, y[:, 0])


def augmented(n=6):
    "A MONAI dataset with random augmentation: per-item seeds must make it resume exactly."
    from monai.data import Dataset
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised

    tf = Compose([RandGaussianNoised("image", prob=0.5), RandFlipd(["image", "label"], prob=0.5, spatial_axis=0)])
    return Dataset(items(n), tf)


def trainer(out, data, steps=10, seed=0, callbacks=(), model=None, **kw):
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-2, log_every=1, out_dir=str(out), progress=False,
                      tensorboard=False, seed=seed, num_threads=1, **kw)
    return Trainer(model or net(), data, ce, cfg, callbacks=callbacks)


class Killed(Exception):
    pass


def kill_at(step):
    def cb(tr):
        if tr.step == step:
            raise Killed
    return cb


def weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("amp,grad_accum", [("none", 1), ("bf16", 2)])
def test_resume_is_bit_identical(tmp_path, amp, grad_accum):
    kw = dict(amp=amp, grad_accum=grad_accum, warmup_steps=2, ckpt_every=4)
    full = trainer(tmp_path / "full", augmented(), **kw)
    r_full = full.fit()
    # killed after step 5: the last checkpoint is at step 4, in the middle of an epoch (3 batches/epoch)
    first = trainer(tmp_path / "cut", augmented(), callbacks=[kill_at(5)], **kw)
    with pytest.raises(Killed):
        first.fit()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 4
    resumed = trainer(tmp_path / "cut", augmented(), model=net(seed=999), **kw)  # different init: must be overwritten
    r_res = resumed.fit()
    assert r_res.step == 10
    assert weights_equal(full.module, resumed.module)
    # the log was cut back to step 4 and continued: same events, same losses
    assert [(e["step"], e["loss"]) for e in r_res.history] == [(e["step"], e["loss"]) for e in r_full.history]
    lines = (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 10


def test_resume_with_user_dataloader(tmp_path):
    "A loader whose order depends on the epoch only (DistributedSampler + set_epoch) is fast-forwarded."
    from torch.utils.data import DataLoader, DistributedSampler

    def loader():
        ds = items(6)
        return DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=1, rank=0, seed=5))

    full = trainer(tmp_path / "full", loader(), ckpt_every=4)
    full.fit()
    with pytest.raises(Killed):
        trainer(tmp_path / "cut", loader(), ckpt_every=4, callbacks=[kill_at(5)]).fit()
    resumed = trainer(tmp_path / "cut", loader(), ckpt_every=4)
    resumed.fit()
    assert weights_equal(full.module, resumed.module)


def test_same_seed_same_numbers(tmp_path):
    runs = [trainer(tmp_path / f"r{i}", augmented(), steps=6, seed=s) for i, s in enumerate([7, 7, 8])]
    results = [r.fit() for r in runs]
    assert weights_equal(runs[0].module, runs[1].module)
    assert [e["loss"] for e in results[0].history] == [e["loss"] for e in results[1].history]
    assert not weights_equal(runs[0].module, runs[2].module)  # another seed: another batch order and dropout


def test_fresh_start_ignores_old_checkpoint(tmp_path):
    a = trainer(tmp_path, items(), steps=3)
    a.fit()
    b = trainer(tmp_path, items(), steps=3, resume=False)
    assert b.fit().step == 3
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 3


def test_corrupt_checkpoint_raises_weights_error(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WeightsError, match="last.pt: cannot read checkpoint"):
        trainer(tmp_path, items(), steps=2).fit()


def test_checkpoint_of_another_model_raises_weights_error(tmp_path):
    trainer(tmp_path, items(), steps=2).fit()
    other = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 1))
    with pytest.raises(WeightsError, match="does not fit"):
        trainer(tmp_path, items(), steps=4, model=other).fit()


DDP_SCRIPT = """
import sys
import torch
from torch import nn
from transfer3d.train import Trainer, TrainConfig, cleanup_distributed, init_distributed

info = init_distributed()
torch.manual_seed(0)
net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
g = torch.Generator().manual_seed(0)
data = [{"image": torch.rand(1, 8, 8, 8, generator=g), "label": torch.randint(0, 2, (1, 8, 8, 8), generator=g)}
        for _ in range(8)]
cfg = TrainConfig(steps=4, batch_size=2, log_every=2, out_dir=sys.argv[1], progress=False, tensorboard=False, device="cpu")
res = Trainer(net, data, lambda p, y: nn.functional.cross_entropy(p, y[:, 0]), cfg).fit()
w = torch.cat([p.detach().flatten() for p in net.parameters()])
# one write() per line: print() writes the text and the newline separately, and two ranks share the pipe
sys.stdout.write(f"RESULT rank={info.rank} world={info.world_size} step={res.step} wrote={res.checkpoint is not None} "
                 f"w={w.double().sum().item():.10f}\\n")
sys.stdout.flush()
cleanup_distributed()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted(re.findall(r"RESULT rank=\d+ world=\d+ step=\d+ wrote=\w+ w=-?[\d.]+", proc.stdout))
    assert len(results) == 2, proc.stdout
    assert "rank=0 world=2 step=4 wrote=True" in results[0]
    assert "rank=1 world=2 step=4 wrote=False" in results[1]
    assert results[0].split("w=")[1] == results[1].split("w=")[1]  # DDP kept the replicas identical
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["last.pt"], files  # exactly one checkpoint, written by rank 0, no temporaries left
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2  # steps 2 and 4, rank 0 only
