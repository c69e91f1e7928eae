"""The sweep runner end to end: the demo sweep (real notebooks), resume, failure isolation, SIGKILL, Dask.

The mechanics tests use a stand-in notebook that writes metrics.json in a fraction of a second (optionally
after sleeping, or failing on request), so they test the runner, not the training.
"""
import json
import os
import signal
import subprocess
import sys
import time

import nbformat
import pandas as pd
import pytest
import yaml

from conftest import ROOT

BIN = os.path.dirname(sys.executable)


def toy_notebook(path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [
        nbformat.v4.new_code_cell("out_dir = 'x'\nseed = 0\nfail = False\nsleep = 0.0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import json, time\nfrom pathlib import Path\ntime.sleep(sleep)\n"
            "if fail: raise RuntimeError(f'planted failure, seed {seed}')\n"
            "Path(out_dir).mkdir(parents=True, exist_ok=True)\n"
            "json.dump({'dice': (seed + 1) / 10, 'complete': True}, open(Path(out_dir) / 'metrics.json', 'w'))"),
    ]
    nbformat.write(nb, path)
    return path


def write_sweep(tmp_path, **spec):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"notebook": str(toy_notebook(tmp_path / "toy.ipynb")), "report": None, **spec}))
    return path


def cli(*args, **kw):
    return subprocess.run([os.path.join(BIN, "transfer3d"), *map(str, args)], capture_output=True, text=True,
                          cwd=kw.pop("cwd", ROOT), **kw)


def test_demo_quick_runs_and_rerun_executes_nothing(tmp_path):
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--out", out, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and (table["status"] == "done").all()
    assert set(table["strategy"]) == {"scratch", "freeze_stages=1"} and set(table["n_train"]) == {1, 2}
    assert table["dice"].between(0, 1).all()
    assert (out / "learning_curve.png").stat().st_size > 1000
    report = nbformat.read(out / "report.ipynb", 4)
    pngs = [o for c in report.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert pngs, "the report shows no figure"
    per_run = {r: json.loads((out / "runs" / r / "status.json").read_text())["started"] for r in table["run_id"]}
    # a rerun executes nothing new, and keeps the same rows
    again = cli("demo", "--quick", "--out", out, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 executed, 5 already done" in again.stdout
    assert {r: json.loads((out / "runs" / r / "status.json").read_text())["started"] for r in table["run_id"]} == per_run
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), table)


def test_failure_is_isolated_and_reported(tmp_path):
    sweep = write_sweep(tmp_path, grid={"seed": [0, 1, 2], "fail": [False, True]})
    res = cli("sweep", sweep, "--out", tmp_path / "out", "--workers", 2, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "3 failed" in res.stdout and "FAILED fail-True_seed-1" in res.stdout
    assert "RuntimeError: planted failure, seed 1" in res.stdout
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(table) == 6 and (table["status"] == "done").sum() == 3
    bad = table[table["status"] == "failed"]
    assert bad["error"].str.startswith("RuntimeError: planted failure").all()
    for d in bad["run_dir"]:  # the failing run keeps its executed notebook with the error
        assert "planted failure" in open(os.path.join(d, "run.ipynb")).read()


def test_sigkill_then_rerun_loses_and_duplicates_nothing(tmp_path):
    sweep = write_sweep(tmp_path, grid={"seed": list(range(6))}, set={"sleep": 3.0})
    out = tmp_path / "out"
    proc = subprocess.Popen([os.path.join(BIN, "transfer3d"), "sweep", str(sweep), "--out", str(out), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some runs are done and others are running
        states = [json.loads(p.read_text())["status"] for p in out.glob("runs/*/status.json")] if out.exists() else []
        if states.count("done") >= 2 and "running" in states:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the sweep never reached a state with finished and running runs")
    done_before = {p.parent.name: json.loads(p.read_text())["started"] for p in out.glob("runs/*/status.json")
                   if json.loads(p.read_text())["status"] == "done"}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(1.5)
    res = cli("sweep", sweep, "--out", out, "--workers", 2, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 6 and table["run_id"].is_unique and (table["status"] == "done").all()
    assert sorted(table["seed"]) == list(range(6))
    assert sorted(table["dice"].round(2)) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    after = {p.parent.name: json.loads(p.read_text())["started"] for p in out.glob("runs/*/status.json")}
    assert all(after[k] == v for k, v in done_before.items()), "a run finished before the kill was executed again"


def test_dask_local_cluster_runs_the_same_sweep(tmp_path):
    pytest.importorskip("distributed")
    from transfer3d.sweep import run_sweep

    sweep = write_sweep(tmp_path, grid={"seed": [0, 1, 2, 3]})
    res = run_sweep(sweep, tmp_path / "dask", scheduler="local", workers=2, threads=1, progress=False)
    assert res.ok and len(res.executed) == 4
    assert sorted(res.results["dice"]) == [0.1, 0.2, 0.3, 0.4]
    local = run_sweep(sweep, tmp_path / "local", workers=2, threads=1, progress=False)
    assert sorted(local.results["run_id"]) == sorted(res.results["run_id"])  # same runs, same folders


def test_dry_run_and_bad_sweep_file(tmp_path):
    sweep = write_sweep(tmp_path, grid={"seed": [0, 1]})
    res = cli("sweep", sweep, "--out", tmp_path / "o", "--dry-run")
    assert res.returncode == 0 and res.stdout.count("new") == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("notebook: transfer\ngird: {seed: [0]}\n")
    res = cli("sweep", bad, "--out", tmp_path / "o")
    assert res.returncode == 2 and "unknown key 'gird' (did you mean 'grid'?)" in res.stderr and str(bad) in res.stderr


def test_packaged_sweep_files_expand(tmp_path):
    from transfer3d.sweep import expand, load_sweep

    for name, n_runs in (("demo_sweep.yaml", 12), ("sweep_shift_study.yaml", 24)):
        needs, runs = expand(load_sweep(ROOT / "params" / name), tmp_path / name)
        assert len(runs) == n_runs and len(needs) == 1
        assert all(r.params["pretrained"] == f"{needs[0].dir.as_posix()}/pretrained.pt" for r in runs)
        assert all(r.params["data"]["cache_dir"] == f"{(tmp_path / name).resolve().as_posix()}/data" for r in runs)


def test_plain_papermill_with_a_params_file(tmp_path):
    """`papermill nbs/experiments/transfer.ipynb out.ipynb -f params.yaml` runs the experiment notebook as is."""
    params = yaml.safe_load((ROOT / "params" / "demo_transfer.yaml").read_text())
    params.update(out_dir=str(tmp_path / "run"), strategy="scratch", n_train=1, classes=["liver", "spleen"],
                  data={"synth": {"n": 3, "size": 32}, "test": 1, "cache_dir": str(tmp_path / "data")},
                  pipeline={"roi_size": [32, 32, 32]}, train={"steps": 2, "batch_size": 1})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([os.path.join(BIN, "papermill"), str(ROOT / "nbs" / "experiments" / "transfer.ipynb"),
                          str(tmp_path / "out.ipynb"), "-f", str(tmp_path / "p.yaml"), "--cwd", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["complete"] and m["strategy"] == "scratch" and m["classes"] == ["liver", "spleen"]
    out = nbformat.read(tmp_path / "out.ipynb", 4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in out.cells)
    assert any("image/png" in o.get("data", {}) for c in out.cells if c.cell_type == "code" for o in c.get("outputs", []))
