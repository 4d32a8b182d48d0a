"""Multi-host: several processes joined by `jax.distributed` equal one process with as many
devices, for training (killed and resumed), checkpoints, metrics logging and evaluation.

Each process is `python -m difflax.cli --coordinator localhost:PORT --num-processes 2
--process-id I ...` with 2 forced CPU devices (CPU collectives use gloo); this test process
holds the 1-process reference with 4 devices (tests/conftest.py).
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from difflax import cli, workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
STEPS = 6
SMOKE = ["--config", "configs/digits_edm.py:smoke", f"--config.train.steps={STEPS}",
         "--config.train.ckpt_every=2", "--config.train.log_every=2"]
EVALUATE = ["evaluate", "--num", "16", "--batch-size", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(args, *, processes=2, devices=2, delay=0.0):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, str(WORKER), str(delay), "--", "--coordinator", f"localhost:{port}",
         "--num-processes", str(processes), "--process-id", str(i), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(processes)]


def _wait(procs, timeout=1200):
    outputs = [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    return outputs


def _kill_after_checkpoint(procs, directory, step, timeout=1200):
    deadline = time.monotonic() + timeout
    while not (directory / str(step)).is_dir():
        assert all(p.poll() is None for p in procs), "a process ended before it was killed"
        assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.2)
    for p in procs:
        p.kill()
        p.wait()


def test_two_processes_train_resume_and_evaluate_like_one_process(tmp_path):
    assert jax.device_count() == 4 and jax.process_count() == 1
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["train", *SMOKE, "--workdir", str(one)]) == 0

    # 2 processes x 2 devices, killed after their first checkpoint, then resumed.
    procs = _launch(["train", *SMOKE, "--workdir", str(two)], delay=1.5)
    _kill_after_checkpoint(procs, two / "checkpoints", 2)
    saved = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] < STEPS, "the run was not killed mid-way"
    _wait(_launch(["train", *SMOKE, "--workdir", str(two)]))

    (_, _, ema_one), (_, _, ema_two) = wd.load_run(str(one)), wd.load_run(str(two))
    leaves = jax.tree.leaves(jax.tree.map(np.asarray, (ema_one, ema_two)))
    half = len(leaves) // 2
    for a, b in zip(leaves[:half], leaves[half:]):  # equal up to reduction order
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    logged = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6]  # process 0 logs each step once, the killed run's tail trimmed

    # Evaluation: the 2-process run writes one eval.json, equal to the 1-process one.
    assert cli.main([*EVALUATE, "--workdir", str(one)]) == 0
    _wait(_launch([*EVALUATE, "--workdir", str(two)]))
    rows_one = json.loads((one / "eval.json").read_text())
    rows_two = json.loads((two / "eval.json").read_text())
    assert len(rows_two) == len(rows_one) == 1
    for key, value in rows_one[0].items():
        if key == "seconds":
            continue
        if isinstance(value, float):
            np.testing.assert_allclose(rows_two[0][key], value, rtol=1e-3, err_msg=key)
        else:
            assert rows_two[0][key] == value, key
    assert (two / "samples" / "edm_heun_3.png").exists()
