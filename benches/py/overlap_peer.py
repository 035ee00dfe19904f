#!/usr/bin/env python3
"""Python peer for `examples/overlap.rs`: how much does checkpointing stall a (CPU) training loop
when it is done with the stock PyTorch / Lightning / DCP tools?

Usage:
  overlap_peer.py --layers L --hidden H --batch B --steps N --every K --dir DIR --out OUT.json
                  [--modes baseline,torch_save,lightning_async,dcp_async] [--seed S] [--threads T]
                  [--warmup W]

Training loop (the same for every mode, and meant to match the Rust side):
  * torch.set_num_threads(T); float32 on CPU.
  * torch.manual_seed(S), then model = nn.Sequential(Linear(H, H), ReLU, ..., Linear(H, H)):
    L Linear layers (with bias), a ReLU after each but the last.
  * opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01).
  * g = torch.Generator().manual_seed(S); each step (counting from 1) draws
    x = torch.randn(B, H, generator=g) then y = torch.randn(B, H, generator=g);
    loss = mse_loss(model(x), y); opt.zero_grad(); loss.backward(); opt.step().
  * after the optimizer step of steps K, 2K, ...: checkpoint
    {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}.
  Each mode builds a fresh model/optimizer/generator from the same seed, so every mode trains the
  same numbers. Before the first mode, W (default 2) untimed warm-up steps run on a throwaway model
  (thread pools, allocator, page faults), so the first mode measured does not pay for them.

Modes:
  baseline         no checkpoint.
  torch_save       torch.save(ckpt, DIR/torch_save/step-N.pt), then os.fsync of the file (not of
                   its directory). stall = save + fsync; durable = the same instant.
  lightning_async  lightning.pytorch.plugins.io.AsyncCheckpointIO(TorchCheckpointIO()),
                   save_checkpoint(ckpt, DIR/lightning_async/step-N.pt, storage_options=None) as
                   Lightning's Strategy.save_checkpoint calls it, teardown() at the end.
                   The caller thread clones every tensor (apply_to_collection(..., clone)), then a
                   1-worker ThreadPoolExecutor runs TorchCheckpointIO.save_checkpoint ->
                   lightning.fabric.utilities.cloud_io._atomic_save: torch.save into an in-memory
                   io.BytesIO, then inside an fsspec transaction writes bytesbuffer.getvalue() (a
                   second full copy) to a tempfile.mkstemp() file (in $TMPDIR, not next to the
                   target) and on commit shutil.move()s it to the target path (a rename when on
                   the same filesystem, else a copy). No fsync anywhere -> never durable; it
                   returns no future, so "durable_s" is null. To measure when each file is
                   complete (renamed into place, page cache only), this script wraps the inner
                   TorchCheckpointIO.save_checkpoint to timestamp its end ("complete_s"). After
                   teardown it fsyncs every file and reports that time ("post_fsync_ms").
  dcp_async        torch.distributed.checkpoint.async_save({"model": msd, "optimizer": osd,
                   "step": step}, checkpoint_id=DIR/dcp/step-N) with (msd, osd) =
                   torch.distributed.checkpoint.state_dict.get_state_dict(model, opt), in this
                   single process with a gloo process group (world_size 1, FileStore). Before
                   each save, .result() of the previous future (as its docs recommend; that wait
                   is "wait_prev_ms", not part of the stall). stall = get_state_dict + async_save
                   (the default stager deep-copies the state dict to CPU memory synchronously in
                   the caller); durable = the future's done-callback time. DCP's FileSystemWriter
                   defaults to sync_files=True: os.fsync of each data file and of .metadata.tmp
                   before renaming it to .metadata; the directory is not fsynced.

Per mode we record: step_ms (wall time of each step, the checkpoint digest pause excluded),
in_flight (a checkpoint write was not yet complete at the end of the step; the sync torch_save
never is), save_steps, stalls_ms, durable_s (seconds from the start of the save call to
durable, or null), bytes (size of one checkpoint: the file, or the sum of the files in the DCP
directory), peak_rss_extra_mib (peak RSS sampled from /proc/self/statm every 2 ms by a thread,
minus the RSS at the start of the mode, before building the model; the verification is not in
it), wall_s = loop_s + drain_s (loop: the training steps, digest pauses excluded; drain: waiting
for the outstanding writes / teardown at the end), verified (every checkpoint loaded back after
the mode and compared with sha256 digests taken before its save call).

Caveat: the digest pause happens while an earlier async write may still be running in the
background, so background writes get that CPU time for free (reported as "digest_ms"). Use
--no-verify to measure without it.
"""

import argparse
import ctypes
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL_MODES = ["baseline", "torch_save", "lightning_async", "dcp_async"]
MODE_DIR = {"torch_save": "torch_save", "lightning_async": "lightning_async", "dcp_async": "dcp"}
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def log(*a):
    print("[overlap_peer]", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# memory


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def fix_malloc():
    """Make freed big blocks go back to the OS, so that each mode's peak RSS is measured from a
    clean start: glibc's dynamic mmap threshold would otherwise rise to 32 MiB after the first
    free of a large block and keep later tensors on the heap."""
    if LIBC is None:
        return False
    try:
        M_MMAP_THRESHOLD = -3
        return bool(LIBC.mallopt(M_MMAP_THRESHOLD, 128 * 1024))
    except Exception:
        return False


def trim_memory():
    gc.collect()
    if LIBC is not None:
        try:
            LIBC.malloc_trim(0)
        except Exception:
            pass


def rss_bytes():
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


class RssSampler:
    def __init__(self, period_s=0.002):
        self.period_s = period_s
        self.peak = 0
        self.active = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self):
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            while not self._stop.is_set():
                r = int(os.pread(fd, 128, 0).split()[1]) * PAGE_SIZE
                with self._lock:
                    if self.active and r > self.peak:
                        self.peak = r
                time.sleep(self.period_s)
        finally:
            os.close(fd)

    def start(self):
        with self._lock:
            self.peak = rss_bytes()
            self.active = True
        return self.peak

    def stop(self):
        r = rss_bytes()
        with self._lock:
            self.active = False
            self.peak = max(self.peak, r)
            return self.peak

    def close(self):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# digests


def tensor_digest(t):
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def flatten(obj, prefix=""):
    """(path, leaf) pairs of a nested dict/list state dict."""
    if isinstance(obj, dict):
        for k in obj:
            yield from flatten(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def digests(state):
    out = {}
    for path, leaf in flatten(state):
        if isinstance(leaf, torch.Tensor):
            out[path] = ("T", tensor_digest(leaf))
        else:
            out[path] = ("V", repr(leaf))
    return out


def compare_digests(expected, got):
    """Returns (tensor mismatches, other mismatches). A missing or extra path counts as one."""
    tensor_bad = other_bad = 0
    for path in set(expected) | set(got):
        e, g = expected.get(path), got.get(path)
        if e == g:
            continue
        if (e and e[0] == "T") or (g and g[0] == "T"):
            tensor_bad += 1
        else:
            other_bad += 1
    return tensor_bad, other_bad


def skeleton(obj):
    """Shape of a state dict: tensors replaced by (shape, dtype), to build a DCP load target."""
    if isinstance(obj, dict):
        return {k: skeleton(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [skeleton(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(skeleton(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return ("__tensor__", tuple(obj.shape), obj.dtype)
    return obj


def from_skeleton(sk):
    if isinstance(sk, tuple) and len(sk) == 3 and sk[0] == "__tensor__":
        _, shape, dtype = sk
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype)
        return torch.zeros(shape, dtype=dtype)
    if isinstance(sk, dict):
        return {k: from_skeleton(v) for k, v in sk.items()}
    if isinstance(sk, list):
        return [from_skeleton(v) for v in sk]
    if isinstance(sk, tuple):
        return tuple(from_skeleton(v) for v in sk)
    return sk


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


# ---------------------------------------------------------------------------------------------
# training


def build(args):
    torch.manual_seed(args.seed)
    layers = []
    for i in range(args.layers):
        layers.append(nn.Linear(args.hidden, args.hidden))
        if i != args.layers - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    return model, opt, gen


def train_step(model, opt, gen, args):
    x = torch.randn(args.batch, args.hidden, generator=gen)
    y = torch.randn(args.batch, args.hidden, generator=gen)
    loss = F.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def ckpt_of(model, opt, step):
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}


# ---------------------------------------------------------------------------------------------
# savers: prepare(step) -> state (untimed digest happens on it), save(step, state) -> record,
# in_flight() -> bool, drain(), then verify()


class Baseline:
    durability = "none (no checkpoint)"

    def __init__(self, args, root):
        self.dir = None

    def in_flight(self):
        return False

    def drain(self):
        pass

    def close(self):
        pass


class TorchSave:
    durability = ("torch.save(ckpt, path) then os.fsync(file) (directory not fsynced); "
                  "durable when the save call returns")

    def __init__(self, args, root):
        self.dir = os.path.join(root, MODE_DIR["torch_save"])
        self.paths = []

    def path(self, step):
        return os.path.join(self.dir, f"step-{step}.pt")

    def prepare(self, model, opt, step):
        return ckpt_of(model, opt, step)

    def save(self, step, state):
        p = self.path(step)
        t0 = time.perf_counter()
        torch.save(state, p)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        t1 = time.perf_counter()
        self.paths.append(p)
        return {"stall_s": t1 - t0, "durable_s": t1 - t0}

    def in_flight(self):
        return False

    def drain(self):
        pass

    def load(self, step):
        return torch.load(self.path(step), weights_only=True, map_location="cpu")

    def close(self):
        pass


class LightningAsync:
    durability = ("lightning AsyncCheckpointIO(TorchCheckpointIO()): clone on caller thread, then "
                  "in a 1-thread executor _atomic_save = torch.save to io.BytesIO, write of "
                  "getvalue() to a tempfile.mkstemp() file under an fsspec transaction, "
                  "shutil.move to the target on commit; no fsync (page cache only), no future "
                  "-> durable time unknown (null). complete_s = end of the inner "
                  "TorchCheckpointIO.save_checkpoint (measured by wrapping it)")

    def __init__(self, args, root):
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

        self.dir = os.path.join(root, MODE_DIR["lightning_async"])
        self.inner = TorchCheckpointIO()
        self.plugin = AsyncCheckpointIO(self.inner)
        self.lock = threading.Lock()
        self.submitted = 0
        self.completed = 0
        self.ends = {}  # path -> perf_counter at the end of the inner save
        self.starts = {}  # path -> perf_counter at the start of the inner save
        self.paths = []
        self.post_fsync_s = None
        orig = self.inner.save_checkpoint

        def timed_save(checkpoint, path, storage_options=None):
            t0 = time.perf_counter()
            try:
                return orig(checkpoint, path, storage_options=storage_options)
            finally:
                t1 = time.perf_counter()
                with self.lock:
                    self.starts[str(path)] = t0
                    self.ends[str(path)] = t1
                    self.completed += 1

        self.inner.save_checkpoint = timed_save
        self.torn_down = False

    def path(self, step):
        return os.path.join(self.dir, f"step-{step}.pt")

    def prepare(self, model, opt, step):
        return ckpt_of(model, opt, step)

    def save(self, step, state):
        p = self.path(step)
        with self.lock:
            self.submitted += 1
        t0 = time.perf_counter()
        self.plugin.save_checkpoint(state, p, storage_options=None)
        t1 = time.perf_counter()
        self.paths.append(p)
        return {"stall_s": t1 - t0, "durable_s": None, "t0": t0, "path": p}

    def in_flight(self):
        with self.lock:
            return self.completed < self.submitted

    def drain(self):
        self.torn_down = True
        self.plugin.teardown()

    def after_drain(self):
        # not part of the timing: how much was still not durable after teardown
        t0 = time.perf_counter()
        for p in self.paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.post_fsync_s = time.perf_counter() - t0

    def load(self, step):
        return torch.load(self.path(step), weights_only=True, map_location="cpu")

    def close(self):
        if not self.torn_down:
            try:
                self.plugin.teardown()
            except BaseException:
                pass


_PG_STATE = {"inited": False, "store": None}


def ensure_process_group(root):
    import torch.distributed as dist

    if dist.is_initialized():
        return
    fd, store_path = tempfile.mkstemp(prefix=".dcp_store_", dir=root)
    os.close(fd)
    os.remove(store_path)  # FileStore wants to create it
    store = dist.FileStore(store_path, 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    _PG_STATE.update(inited=True, store=store_path)


def destroy_process_group():
    import torch.distributed as dist

    if _PG_STATE["inited"] and dist.is_initialized():
        dist.destroy_process_group()
    if _PG_STATE["store"] and os.path.exists(_PG_STATE["store"]):
        try:
            os.remove(_PG_STATE["store"])
        except OSError:
            pass


class DcpAsync:
    durability = ("torch.distributed.checkpoint.async_save (FileSystemWriter, sync_files=True): "
                  "os.fsync of each data file and of .metadata.tmp before its rename to "
                  ".metadata; directory not fsynced; durable when the future completes")

    def __init__(self, args, root):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        ensure_process_group(root)
        self.dcp = dcp
        self.get_state_dict = get_state_dict
        self.dir = os.path.join(root, MODE_DIR["dcp_async"])
        self.prev = None
        self.futures = []
        self.lock = threading.Lock()
        self.skeletons = {}

    def path(self, step):
        return os.path.join(self.dir, f"step-{step}")

    def prepare(self, model, opt, step):
        # wait for the previous save before the next one (as the async_save docs recommend)
        t0 = time.perf_counter()
        if self.prev is not None:
            self.prev.result()
        t1 = time.perf_counter()
        msd, osd = self.get_state_dict(model, opt)
        t2 = time.perf_counter()
        state = {"model": msd, "optimizer": osd, "step": step}
        self._pending = {"wait_prev_s": t1 - t0, "prep_s": t2 - t1}
        self.skeletons[step] = skeleton(state)
        return state

    def save(self, step, state):
        rec = dict(self._pending)
        t0 = time.perf_counter()
        fut = self.dcp.async_save(state, checkpoint_id=self.path(step))
        t1 = time.perf_counter()
        done = {}

        def cb(_f, done=done):
            done["t"] = time.perf_counter()

        fut.add_done_callback(cb)
        self.prev = fut
        self.futures.append((fut, t0, done))
        rec.update(stall_s=rec["prep_s"] + (t1 - t0), async_save_s=t1 - t0, t0=t0, done=done)
        return rec

    def in_flight(self):
        return self.prev is not None and not self.prev.done()

    def drain(self):
        for fut, _, _ in self.futures:
            fut.result()

    def load(self, step):
        target = from_skeleton(self.skeletons[step])
        self.dcp.load(target, checkpoint_id=self.path(step))
        return target

    def close(self):
        for fut, _, _ in self.futures:
            try:
                fut.result()
            except BaseException:
                pass


SAVERS = {"baseline": Baseline, "torch_save": TorchSave, "lightning_async": LightningAsync,
          "dcp_async": DcpAsync}


# ---------------------------------------------------------------------------------------------


def run_mode(name, args, sampler):
    root = os.path.abspath(args.dir)
    saver = None
    res = {"name": name}
    try:
        sub = MODE_DIR.get(name)
        if sub:  # start from an empty DIR/<mode>
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                shutil.rmtree(d)
            os.makedirs(d, exist_ok=True)
        os.sync()  # earlier modes' dirty pages are not flushed during this one
        trim_memory()
        rss0 = sampler.start()
        saver = SAVERS[name](args, root)
        res["durability"] = saver.durability
        model, opt, gen = build(args)

        step_ms, in_flight, save_steps, stalls_ms, records, digests_by_step = [], [], [], [], [], {}
        digest_s = 0.0
        last_loss = None
        loop_start = time.perf_counter()
        for step in range(1, args.steps + 1):
            t_start = time.perf_counter()
            pause = 0.0
            loss = train_step(model, opt, gen, args)
            if name != "baseline" and step % args.every == 0:
                state = saver.prepare(model, opt, step)
                if args.verify:
                    d0 = time.perf_counter()
                    digests_by_step[step] = digests(state)
                    pause = time.perf_counter() - d0
                    digest_s += pause
                rec = saver.save(step, state)
                del state
                save_steps.append(step)
                stalls_ms.append(rec["stall_s"] * 1e3)
                records.append(rec)
            t_end = time.perf_counter()
            step_ms.append((t_end - t_start - pause) * 1e3)
            in_flight.append(bool(saver.in_flight()))
            last_loss = loss
        loop_s = time.perf_counter() - loop_start - digest_s
        d0 = time.perf_counter()
        saver.drain()
        drain_s = time.perf_counter() - d0
        peak = sampler.stop()
        if hasattr(saver, "after_drain"):
            saver.after_drain()

        # durable / complete times
        durable_s = []
        complete_s = None
        if name == "torch_save":
            durable_s = [r["durable_s"] for r in records]
        elif name == "lightning_async":
            durable_s = [None for _ in records]
            complete_s = []
            for r in records:
                end = saver.ends.get(str(r["path"]))
                complete_s.append(None if end is None else end - r["t0"])
        elif name == "dcp_async":
            durable_s = [r["done"].get("t") - r["t0"] if "t" in r["done"] else None
                         for r in records]

        bytes_each = []
        for step in save_steps:
            p = saver.path(step)
            bytes_each.append(dir_bytes(p) if os.path.isdir(p) else os.path.getsize(p))

        res.update({
            "wall_s": loop_s + drain_s,
            "loop_s": loop_s,
            "drain_s": drain_s,
            "step_ms": step_ms,
            "in_flight": in_flight,
            "save_steps": save_steps,
            "stalls_ms": stalls_ms,
            "durable_s": durable_s,
            "bytes": bytes_each[0] if bytes_each else 0,
            "bytes_each": bytes_each,
            "peak_rss_extra_mib": (peak - rss0) / MIB,
            "rss_start_mib": rss0 / MIB,
            "digest_ms": digest_s * 1e3,
            "final_loss": float(last_loss.detach()) if last_loss is not None else None,
        })
        gbps = [None if (t is None or t <= 0) else b / t / 1e9
                for b, t in zip(bytes_each, durable_s)]
        res["write_gbps"] = gbps
        if complete_s is not None:
            res["complete_s"] = complete_s
            res["complete_gbps"] = [None if (t is None or t <= 0) else b / t / 1e9
                                    for b, t in zip(bytes_each, complete_s)]
            res["post_fsync_ms"] = saver.post_fsync_s * 1e3
        if name == "dcp_async":
            res["wait_prev_ms"] = [r["wait_prev_s"] * 1e3 for r in records]
            res["prep_ms"] = [r["prep_s"] * 1e3 for r in records]
            res["async_save_ms"] = [r["async_save_s"] * 1e3 for r in records]

        # verification (after everything is flushed; not timed, not in the RSS peak)
        del model, opt
        trim_memory()
        if name == "baseline":
            res["verified"] = None
            res["verify_note"] = "no checkpoints"
        elif not args.verify:
            res["verified"] = None
            res["verify_note"] = "verification disabled (--no-verify)"
        else:
            tbad = obad = 0
            n_tensors = 0
            for step in save_steps:
                loaded = saver.load(step)
                got = digests(loaded)
                del loaded
                exp = digests_by_step[step]
                n_tensors += sum(1 for v in exp.values() if v[0] == "T")
                a, b = compare_digests(exp, got)
                tbad += a
                obad += b
            how = ("dcp.load into a fresh NaN-filled state dict of the same layout"
                   if name == "dcp_async" else "torch.load(weights_only=True)")
            res["verified"] = (tbad + obad) == 0
            res["mismatches"] = tbad + obad
            res["verify_note"] = (
                f"{len(save_steps)} checkpoints, {n_tensors} tensors compared by sha256 of "
                f"their bytes (digests taken before each save call), loaded with {how}; "
                f"{tbad} tensor mismatches, {obad} non-tensor mismatches")
    except BaseException as e:  # report per mode, keep going
        if isinstance(e, KeyboardInterrupt):
            raise
        log(f"mode {name} failed:\n{traceback.format_exc()}")
        if sampler.active:
            sampler.stop()
        res = {"name": name, "error": f"{type(e).__name__}: {e}"}
    finally:
        if saver is not None:
            saver.close()
        trim_memory()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default=",".join(ALL_MODES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before mode 1")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    args = ap.parse_args()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in SAVERS:
            ap.error(f"unknown mode {m!r} (known: {', '.join(ALL_MODES)})")
    if args.every <= 0 or args.steps <= 0 or args.layers <= 0:
        ap.error("--steps, --every and --layers must be positive")

    torch.set_num_threads(args.threads)
    os.makedirs(args.dir, exist_ok=True)
    malloc_fixed = fix_malloc()

    try:
        import lightning

        lightning_version = lightning.__version__
    except Exception as e:  # reported, the lightning mode will fail on its own
        lightning_version = f"unavailable: {e}"

    if args.warmup > 0:
        model, opt, gen = build(args)
        for _ in range(args.warmup):
            train_step(model, opt, gen, args)
        del model, opt, gen
        trim_memory()

    sampler = RssSampler()
    results = []
    try:
        for m in modes:
            log(f"mode {m} ...")
            r = run_mode(m, args, sampler)
            if "error" in r:
                log(f"mode {m}: error {r['error']}")
            else:
                st = r["stalls_ms"]
                log(f"mode {m}: wall {r['wall_s']:.3f}s (loop {r['loop_s']:.3f} + drain "
                    f"{r['drain_s']:.3f}), median step {sorted(r['step_ms'])[len(r['step_ms']) // 2]:.1f}"
                    f" ms, stalls {[round(s, 1) for s in st]} ms, durable_s {r['durable_s']}, "
                    f"bytes {r['bytes']}, peak rss +{r['peak_rss_extra_mib']:.0f} MiB, "
                    f"verified {r['verified']}")
            results.append(r)
    finally:
        sampler.close()
        destroy_process_group()

    out = {
        "modes": results,
        "torch_version": torch.__version__,
        "lightning_version": lightning_version,
        "threads": torch.get_num_threads(),
        "python_version": sys.version.split()[0],
        "config": {"layers": args.layers, "hidden": args.hidden, "batch": args.batch,
                   "steps": args.steps, "every": args.every, "seed": args.seed,
                   "warmup": args.warmup, "verify": args.verify},
        "notes": {
            "step_ms": "wall time of each step incl. any save call and DCP wait on the previous "
                       "future; the digest pause is excluded",
            "wall_s": "loop_s (training, digest pauses excluded) + drain_s (waiting for the "
                      "outstanding writes / teardown at the end)",
            "durable_s": "seconds from the start of the save call to durable (fsync done), "
                         "null where unknown",
            "peak_rss_extra_mib": "peak RSS (sampled every 2 ms) minus RSS at mode start "
                                  "(before building the model); malloc mmap threshold fixed "
                                  f"at 128 KiB: {malloc_fixed}",
        },
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(out), f, indent=1, allow_nan=False, default=str)
    os.replace(tmp, args.out)


def _finite(o):
    """NaN/inf -> null, so that the output is strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


if __name__ == "__main__":
    main()
