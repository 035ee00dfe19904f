"""A process killed (SIGKILL) while ckptio.AsyncCheckpointIO writes leaves every checkpoint
path absent or whole."""

import os
import random
import signal
import subprocess
import sys
import time

import torch

import ckptio

CHILD = r"""
import sys, torch, ckptio
out = sys.argv[1]
io = ckptio.AsyncCheckpointIO()
step = 0
while True:
    state = {"step": step, "w": torch.full((2 << 20,), float(step)), "b": torch.arange(step % 7 + 1)}
    io.save_checkpoint(state, f"{out}/c{step % 3}.ckpt")
    if step == 3:
        io._runtime.engine.flush()
        print("ready", flush=True)
    step += 1
"""

KILLS = 12


def _check_whole(out):
    for name in os.listdir(out):
        path = os.path.join(out, name)
        state = torch.load(path, weights_only=True)
        step = state["step"]
        assert name == f"c{step % 3}.ckpt", name
        assert torch.equal(state["w"], torch.full((2 << 20,), float(step))), name
        assert torch.equal(state["b"], torch.arange(step % 7 + 1)), name


def test_every_path_is_absent_or_whole_after_a_kill_mid_write(tmp_path):
    rng = random.Random(11)
    interrupted = 0
    for k in range(KILLS):
        out = tmp_path / f"run{k}"
        out.mkdir()
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        interrupted += ckptio.clean_temp_files(out) > 0
        _check_whole(out)
        assert len(os.listdir(out)) == 3
    # The child saves without pause: most kills land while a file is being written.
    assert interrupted >= KILLS // 3, f"only {interrupted} of {KILLS} kills landed during a write"
