#!/usr/bin/env python3
"""Lightning Trainer benchmark for `examples/overlap.rs`: what does checkpointing cost a real
`lightning.Trainer` with each CheckpointIO plugin, ckptio's and Lightning's own?

Usage:
  lightning_bench.py --layers L --hidden H --batch B --steps N --every K --dir DIR --out OUT.json
                     [--modes none,lightning_torch,lightning_async,ckptio_async,ckptio_async_wp,ckptio_torch]
                     [--rounds R] [--seed S] [--threads T] [--warmup W] [--no-verify]

Training (the same for every mode, and the same model and data as the Rust section's loop and
`overlap_peer.py`):
  * torch.set_num_threads(T); float32 on CPU.
  * torch.manual_seed(S), then a LightningModule around nn.Sequential(Linear(H, H), ReLU, ...,
    Linear(H, H)): L Linear layers (with bias), a ReLU after each but the last; loss =
    mse_loss(net(x), y); AdamW(lr=1e-3, weight_decay=0.01).
  * Data: g = torch.Generator().manual_seed(S); for each of the N steps x = randn(B, H) then
    y = randn(B, H) from g, generated once before any mode runs (not timed) and served as
    ready-made batches (DataLoader(batch_size=None)).
  * lightning.Trainer(accelerator="cpu", devices=1, max_steps=N, max_epochs=1, logger=False,
    enable_progress_bar=False, enable_model_summary=False), one fresh Trainer and model per mode
    and round, with ModelCheckpoint(dirpath=DIR/<mode>, filename="step-{step}",
    every_n_train_steps=K, save_top_k=-1): a checkpoint after the optimizer step of steps
    K, 2K, ...; the Trainer builds the dict (state_dict, optimizer_states, loops, callbacks,
    ...) and hands it to its CheckpointIO plugin.
  Before the first mode, W (default 2) untimed warm-up steps run in a throwaway Trainer.

Modes (the plugin the Trainer gets, always inside the timing proxy described below):
  none             enable_checkpointing=False, no ModelCheckpoint: the baseline.
  lightning_torch  Lightning's default TorchCheckpointIO: torch.save into memory, then written
                   to a temporary file moved into place, synchronously; no fsync (page cache).
  lightning_async  Lightning's AsyncCheckpointIO(): clones every tensor on the calling thread,
                   then the default TorchCheckpointIO's save in a 1-thread executor; no fsync.
                   The Strategy gives a bare AsyncCheckpointIO the default TorchCheckpointIO;
                   behind the proxy it cannot see it, so the proxy sets it the same way.
  ckptio_async     ckptio.AsyncCheckpointIO(): the structure pickled and the tensors copied into
                   ckptio's staging pool on the calling thread, the write (atomic, fsync of the
                   file and its directory) on ckptio's background writer.
  ckptio_async_wp  ckptio.AsyncCheckpointIO(write_protect=True): large CPU tensors write-protected
                   on the calling thread instead of copied, and copied by a background thread
                   (Linux with userfaultfd; elsewhere it copies like ckptio_async).
  ckptio_torch     ckptio.TorchCheckpointIO(): the same file written synchronously, durable.
  DCP's async_save is not a mode here: Lightning has no CheckpointIO for it on one device (its
  DCP saves belong to the FSDP and ModelParallel strategies); overlap_peer.py measures it in a
  plain loop.

Measures, per mode (rounds merged: step series appended, wall times summed):
  step_ms      each step from on_train_batch_start (a Callback) to the LightningModule's
               on_train_batch_end, which Lightning calls after every callback's, ModelCheckpoint's
               save included; the digest pause (below) taken out.
  stalls_ms    time inside the plugin's save_checkpoint as the Trainer calls it, measured by a
               proxy CheckpointIO around the plugin that forwards every call.
  in_flight    per step: a save was being written at the step's start or at its end (the
               interference compares the steps during which a write ran with the others).
  wall_s       loop_s (first step's start to last step's end, digest pauses out) + drain_s (the
               plugin's teardown, which the Trainer calls at the end of fit: ckptio drains its
               queue, Lightning's AsyncCheckpointIO joins its executor). overhead = wall_s of a
               mode / wall_s of none - 1.
  durable_s    seconds from the start of save_checkpoint until the file is durable: the end of
               the call for ckptio_torch; for ckptio_async, when the engine's handle of that save
               resolves (the proxy keeps the handles the plugin drops and a thread waits on
               them). null for Lightning's plugins, which never fsync.
  complete_s   seconds until the file is complete in the page cache (renamed into place):
               lightning_torch at the end of the call, lightning_async at the end of the inner
               TorchCheckpointIO.save_checkpoint (wrapped to timestamp it).
  m0_ms        M0, one memcpy of the checkpoint's tensors: every tensor of the last checkpoint
               dict the Trainer passed copied into a warm tensor of the same shape
               (Tensor.copy_), median of 5, in this process after the mode's fit. clone_ms: the
               same tensors cloned (fresh memory each time, as Lightning's AsyncCheckpointIO
               does), median of 3.
  peak_rss_extra_mib  peak RSS (sampled from /proc/self/statm every 2 ms) minus RSS before the
               mode's Trainer and model were built; the verification and M0 are not in it.
  verified     every checkpoint file loaded after the mode with torch.load(weights_only=True);
               its state_dict and optimizer_states compared with SHA-256 digests the proxy took
               before calling the plugin's save (the digest time is in neither the stall nor the
               step time nor the wall time). Every save step must have its file.
"""

import argparse
import json
import logging
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overlap_peer as peer  # noqa: E402  (its memory and digest helpers)

ALL_MODES = ["none", "lightning_torch", "lightning_async", "ckptio_async", "ckptio_async_wp",
             "ckptio_torch"]
DURABILITY = {
    "none": "none (no checkpoint)",
    "lightning_torch": "Lightning TorchCheckpointIO: torch.save to memory, temp file moved into "
                       "place; no fsync (page cache only)",
    "lightning_async": "Lightning AsyncCheckpointIO: clone on the caller, TorchCheckpointIO's save "
                       "in a 1-thread executor; no fsync (page cache only)",
    "ckptio_async": "ckptio.AsyncCheckpointIO: staged copy, background write; fsync file + "
                    "rename + fsync dir (atomic, durable)",
    "ckptio_async_wp": "ckptio.AsyncCheckpointIO(write_protect=True): pages write-protected, "
                       "copied in the background; fsync file + rename + fsync dir (atomic, durable)",
    "ckptio_torch": "ckptio.TorchCheckpointIO: synchronous; fsync file + rename + fsync dir "
                    "(atomic, durable)",
}


def log(*a):
    print("[lightning_bench]", *a, file=sys.stderr, flush=True)


def quiet_lightning():
    """Lightning's banners and tips off (call after importing it); warnings stay on except
    the two every run of this script would print."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")


# ---------------------------------------------------------------------------------------------
# the checkpoint's verified part


def verified_part(checkpoint):
    """What the verification compares: the model's and the optimizer's state."""
    return {"state_dict": checkpoint["state_dict"],
            "optimizer_states": checkpoint["optimizer_states"]}


def tensors_of(obj):
    return [leaf for _, leaf in peer.flatten(obj) if isinstance(leaf, torch.Tensor)]


# ---------------------------------------------------------------------------------------------
# the timing proxy


def make_proxy_class():
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

    class TimedCheckpointIO(CheckpointIO):
        """Forwards every call to `inner`; times save_checkpoint (the stall) and teardown (the
        drain); takes the verification digests before the inner save, outside both."""

        def __init__(self, inner, verify):
            super().__init__()
            self.inner = inner
            self.verify = verify
            self.records = []  # per save: path, t0, stall_s
            self.digests = {}  # path -> digests of the verified part, before the save
            self.digest_s = 0.0
            self.drain_s = 0.0
            self.last_checkpoint = None
            self.on_saved = None  # hook of the mode: (path, t0) after the inner save returned

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if self.verify:
                d0 = time.perf_counter()
                self.digests[str(path)] = peer.digests(verified_part(checkpoint))
                self.digest_s += time.perf_counter() - d0
            t0 = time.perf_counter()
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
            t1 = time.perf_counter()
            self.records.append({"path": str(path), "t0": t0, "stall_s": t1 - t0})
            if self.on_saved is not None:
                self.on_saved(str(path), t0)
            self.last_checkpoint = checkpoint
            return None

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return self.inner.load_checkpoint(path, map_location=map_location,
                                              weights_only=weights_only)

        def remove_checkpoint(self, path):
            return self.inner.remove_checkpoint(path)

        def teardown(self):
            t0 = time.perf_counter()
            try:
                return self.inner.teardown()
            finally:
                self.drain_s += time.perf_counter() - t0

        def __getattr__(self, name):
            # anything else the Trainer might ask of the plugin
            if name == "inner":
                raise AttributeError(name)
            return getattr(self.inner, name)

    return TimedCheckpointIO


# ---------------------------------------------------------------------------------------------
# modes: the plugin, and what each can tell about its writes


class Mode:
    """The plugin of one mode and its view of the writes in flight and their end times."""

    checkpointing = True

    def __init__(self, name):
        self.name = name
        self.plugin = self.make_plugin()
        self.error = None

    def in_flight(self):
        return False

    def durable_s(self, records):
        return [None for _ in records]

    def complete_s(self, records):
        return None

    def close(self):
        pass


class NoCheckpoint(Mode):
    checkpointing = False

    def make_plugin(self):
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        return TorchCheckpointIO()  # the Strategy's default; never called


class LightningTorch(Mode):
    def make_plugin(self):
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        return TorchCheckpointIO()

    def complete_s(self, records):
        return [r["stall_s"] for r in records]


class LightningAsync(Mode):
    def make_plugin(self):
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
        from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

        plugin = AsyncCheckpointIO()
        # What Strategy.checkpoint_io does for a bare AsyncCheckpointIO.
        plugin.checkpoint_io = TorchCheckpointIO()
        self.lock = threading.Lock()
        self.submitted = 0
        self.completed = 0
        self.ends = {}
        inner = plugin.checkpoint_io
        orig = inner.save_checkpoint

        def timed_save(checkpoint, path, storage_options=None):
            try:
                return orig(checkpoint, path, storage_options=storage_options)
            finally:
                t1 = time.perf_counter()
                with self.lock:
                    self.ends[str(path)] = t1
                    self.completed += 1

        inner.save_checkpoint = timed_save
        orig_outer = plugin.save_checkpoint

        def counted_save(*args, **kwargs):
            with self.lock:
                self.submitted += 1
            return orig_outer(*args, **kwargs)

        plugin.save_checkpoint = counted_save
        return plugin

    def in_flight(self):
        with self.lock:
            return self.completed < self.submitted

    def complete_s(self, records):
        out = []
        for r in records:
            end = self.ends.get(r["path"])
            out.append(None if end is None else end - r["t0"])
        return out


class CkptioAsync(Mode):
    write_protect = False

    def make_plugin(self):
        import ckptio

        plugin = ckptio.AsyncCheckpointIO(write_protect=self.write_protect)
        self.handles = []  # (path, handle)
        self.done_at = {}  # path -> perf_counter when its handle resolved
        self.reports = {}
        self.lock = threading.Lock()
        self.queue = queue.SimpleQueue()
        self.watcher = threading.Thread(target=self._watch, name="durable-watch", daemon=True)
        self.watcher.start()
        runtime = plugin._runtime
        submit = runtime.submit

        def kept_submit(obj, path, durable):
            h = submit(obj, path, durable)
            with self.lock:
                self.handles.append((path, h))
            self.queue.put((path, h))
            return h

        runtime.submit = kept_submit
        return plugin

    def _watch(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            path, h = item
            try:
                report = h.wait()  # GIL released while it waits
            except BaseException as e:  # the mode fails with it
                with self.lock:
                    self.error = f"{type(e).__name__}: {e}"
                    self.done_at[path] = time.perf_counter()
                continue
            t = time.perf_counter()
            with self.lock:
                self.done_at[path] = t
                self.reports[path] = report

    def in_flight(self):
        with self.lock:
            return any(not h.done() for _, h in self.handles)

    def durable_s(self, records):
        with self.lock:
            return [self.done_at[r["path"]] - r["t0"] if r["path"] in self.done_at else None
                    for r in records]

    def close(self):
        self.queue.put(None)
        self.watcher.join()


class CkptioAsyncWriteProtected(CkptioAsync):
    write_protect = True


class CkptioTorch(Mode):
    def make_plugin(self):
        import ckptio

        return ckptio.TorchCheckpointIO()

    def durable_s(self, records):
        return [r["stall_s"] for r in records]


MODES = {"none": NoCheckpoint, "lightning_torch": LightningTorch,
         "lightning_async": LightningAsync, "ckptio_async": CkptioAsync,
         "ckptio_async_wp": CkptioAsyncWriteProtected, "ckptio_torch": CkptioTorch}


# ---------------------------------------------------------------------------------------------
# model, data, trainer


def make_data(args):
    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.steps):
        x = torch.randn(args.batch, args.hidden, generator=g)
        y = torch.randn(args.batch, args.hidden, generator=g)
        batches.append((x, y))
    return batches


class Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def make_classes():
    import lightning.pytorch as pl

    class MLP(pl.LightningModule):
        def __init__(self, layers, hidden, timer):
            super().__init__()
            mods = []
            for i in range(layers):
                mods.append(nn.Linear(hidden, hidden))
                if i != layers - 1:
                    mods.append(nn.ReLU())
            self.net = nn.Sequential(*mods)
            self._timer = timer

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            # Lightning calls this after every callback's on_train_batch_end, ModelCheckpoint's
            # (the save) included: the step ends here.
            if self._timer is not None:
                self._timer.step_end()

    class StepTimer(pl.Callback):
        """Step start (on_train_batch_start); the step's end comes from the module's hook."""

        def __init__(self, proxy, mode):
            self.proxy = proxy
            self.mode = mode
            self.step_ms = []
            self.in_flight = []
            self.first_start = None
            self.last_end = None
            self.digest_total = 0.0
            self._t = None
            self._d = 0.0
            self._busy = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._busy = bool(self.mode.in_flight())
            self._t = time.perf_counter()
            self._d = self.proxy.digest_s
            if self.first_start is None:
                self.first_start = self._t
                self.digest_before = self.proxy.digest_s

        def step_end(self):
            t = time.perf_counter()
            pause = self.proxy.digest_s - self._d
            self.step_ms.append((t - self._t - pause) * 1e3)
            self.in_flight.append(self._busy or bool(self.mode.in_flight()))
            self.last_end = t

        def loop_s(self):
            return (self.last_end - self.first_start
                    - (self.proxy.digest_s - self.digest_before))

    return MLP, StepTimer


def trainer_for(args, root, mode, proxy, timer, name):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [timer] if timer is not None else []
    if mode.checkpointing:
        callbacks.append(ModelCheckpoint(
            dirpath=os.path.join(root, name), filename="step-{step}",
            auto_insert_metric_name=False, every_n_train_steps=args.every, save_top_k=-1,
            save_last=False))
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        enable_checkpointing=mode.checkpointing, callbacks=callbacks, plugins=[proxy],
        default_root_dir=os.path.join(root, "trainer"))


def loader(batches):
    return torch.utils.data.DataLoader(Batches(batches), batch_size=None, shuffle=False,
                                       num_workers=0)


# ---------------------------------------------------------------------------------------------
# M0


def m0_of(checkpoint):
    """(median memcpy s into warm tensors, median clone s) of the checkpoint's tensors."""
    src = [t.detach() for t in tensors_of(checkpoint)]
    dst = [torch.empty_like(t) for t in src]
    for d, s in zip(dst, src):
        d.copy_(s)
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        copies.append(time.perf_counter() - t0)
    del dst
    peer.trim_memory()
    clones = []
    for _ in range(3):
        t0 = time.perf_counter()
        c = [s.clone() for s in src]
        clones.append(time.perf_counter() - t0)
        del c
        peer.trim_memory()
    return statistics.median(copies), statistics.median(clones)


# ---------------------------------------------------------------------------------------------
# one mode, one round


def run_mode(name, args, batches, sampler, classes, proxy_cls):
    MLP, StepTimer = classes
    root = os.path.abspath(args.dir)
    mdir = os.path.join(root, name)
    if os.path.isdir(mdir):
        shutil.rmtree(mdir)
    mode = None
    try:
        os.sync()  # earlier modes' dirty pages are not flushed during this one
        peer.trim_memory()
        rss0 = sampler.start()
        mode = MODES[name](name)
        proxy = proxy_cls(mode.plugin, args.verify)
        timer = StepTimer(proxy, mode)
        torch.manual_seed(args.seed)
        model = MLP(args.layers, args.hidden, timer)
        trainer = trainer_for(args, root, mode, proxy, timer, name)
        trainer.fit(model, train_dataloaders=loader(batches))
        peak = sampler.stop()
        if mode.error:
            raise RuntimeError(f"background save failed: {mode.error}")
        records = proxy.records
        res = {
            "name": name,
            "durability": DURABILITY[name],
            "loop_s": timer.loop_s(),
            "drain_s": proxy.drain_s,
            "step_ms": timer.step_ms,
            "in_flight": timer.in_flight,
            "save_steps": [int(trainer_step(r["path"])) for r in records],
            "stalls_ms": [r["stall_s"] * 1e3 for r in records],
            "durable_s": mode.durable_s(records),
            "peak_rss_extra_mib": (peak - rss0) / peer.MIB,
            "digest_ms": proxy.digest_s * 1e3,
            "steps_run": trainer.global_step,
        }
        res["wall_s"] = res["loop_s"] + res["drain_s"]
        complete = mode.complete_s(records)
        if complete is not None:
            res["complete_s"] = complete
        sizes = [os.path.getsize(r["path"]) for r in records if os.path.exists(r["path"])]
        res["bytes"] = sizes[0] if sizes else 0
        if isinstance(mode, CkptioAsync):
            res["engine_reports"] = [mode.reports.get(r["path"]) for r in records]
        if proxy.last_checkpoint is not None:
            m0, clone = m0_of(proxy.last_checkpoint)
            res["m0_ms"] = m0 * 1e3
            res["clone_ms"] = clone * 1e3
            res["state_bytes"] = sum(t.numel() * t.element_size()
                                     for t in tensors_of(proxy.last_checkpoint))
        del model, trainer
        proxy.last_checkpoint = None
        peer.trim_memory()
        res.update(verify(name, args, proxy))
        return res
    except BaseException as e:  # reported per mode; the caller fails the run
        if isinstance(e, KeyboardInterrupt):
            raise
        log(f"mode {name} failed:\n{traceback.format_exc()}")
        if sampler.active:
            sampler.stop()
        return {"name": name, "error": f"{type(e).__name__}: {e}"}
    finally:
        if mode is not None:
            mode.close()
        if not args.keep and os.path.isdir(mdir):
            shutil.rmtree(mdir)
        peer.trim_memory()


def trainer_step(path):
    base = os.path.basename(path)
    return base[len("step-"):].split(".")[0]


def verify(name, args, proxy):
    if name == "none":
        return {"verified": None, "verify_note": "no checkpoints"}
    if not args.verify:
        return {"verified": None, "verify_note": "verification disabled (--no-verify)"}
    expected_steps = list(range(args.every, args.steps + 1, args.every))
    saved = [int(trainer_step(r["path"])) for r in proxy.records]
    problems = []
    if saved != expected_steps:
        problems.append(f"saved steps {saved}, expected {expected_steps}")
    tbad = obad = n_tensors = 0
    for r in proxy.records:
        path = r["path"]
        try:
            loaded = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            problems.append(f"{os.path.basename(path)}: {type(e).__name__}: {e}")
            continue
        got = peer.digests(verified_part(loaded))
        if loaded.get("global_step") != int(trainer_step(path)):
            problems.append(f"{os.path.basename(path)} holds global_step "
                            f"{loaded.get('global_step')}")
        del loaded
        exp = proxy.digests[path]
        n_tensors += sum(1 for v in exp.values() if v[0] == "T")
        a, b = peer.compare_digests(exp, got)
        tbad += a
        obad += b
    if tbad or obad:
        problems.append(f"{tbad} tensor mismatches, {obad} non-tensor mismatches")
    if problems:
        return {"verified": False, "verify_note": "; ".join(problems)}
    return {"verified": True, "checked_files": len(saved), "checked_tensors": n_tensors,
            "verify_note": checked_note(len(saved), n_tensors)}


def checked_note(files, tensors):
    return f"{files} checkpoints, {tensors} tensors bit-exact"



# ---------------------------------------------------------------------------------------------
# rounds


def merge(acc, r, offset):
    """Adds another round of the same mode: series appended (save steps shifted by `offset`),
    wall times summed, the worst verification kept."""
    if acc is None:
        r = dict(r)
        r["m0_ms_rounds"] = [r["m0_ms"]] if "m0_ms" in r else []
        r["clone_ms_rounds"] = [r["clone_ms"]] if "clone_ms" in r else []
        r["wall_s_rounds"] = [r["wall_s"]]
        return r
    if "error" in acc:
        return acc
    if "error" in r:
        return {"name": r["name"], "error": r["error"]}
    for k in ("wall_s", "loop_s", "drain_s", "digest_ms"):
        acc[k] += r[k]
    for k in ("step_ms", "in_flight", "stalls_ms", "durable_s", "complete_s", "engine_reports"):
        if k in acc:
            acc[k] = acc[k] + r[k]
    acc["save_steps"] = acc["save_steps"] + [s + offset for s in r["save_steps"]]
    acc["peak_rss_extra_mib"] = max(acc["peak_rss_extra_mib"], r["peak_rss_extra_mib"])
    acc["wall_s_rounds"].append(r["wall_s"])
    if "m0_ms" in r:
        acc["m0_ms_rounds"].append(r["m0_ms"])
        acc["clone_ms_rounds"].append(r["clone_ms"])
    if acc["verified"] is True and r["verified"] is True:
        acc["checked_files"] += r["checked_files"]
        acc["checked_tensors"] += r["checked_tensors"]
        acc["verify_note"] = checked_note(acc["checked_files"], acc["checked_tensors"])
    elif acc["verified"] is not False and r["verified"] is not None:
        acc["verified"], acc["verify_note"] = r["verified"], r["verify_note"]
    return acc


def ckptio_source():
    """The ckptio package measured: its version, and the commit of the checkout it is
    installed from (editable installs run that checkout's Python files), with "-dirty" when
    its folder has changes not committed."""
    import ckptio

    folder = os.path.dirname(os.path.dirname(os.path.abspath(ckptio.__file__)))

    def git(*a):
        try:
            out = subprocess.run(["git", "-C", folder, *a], capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", "."):
        commit += "-dirty"
    return {"version": ckptio.__version__, "folder": folder, "commit": commit}


def warm_up(args, batches, classes, proxy_cls):
    MLP, _ = classes
    torch.manual_seed(args.seed)
    mode = NoCheckpoint("none")
    proxy = proxy_cls(mode.plugin, False)
    model = MLP(args.layers, args.hidden, None)
    a = argparse.Namespace(**vars(args))
    a.steps = args.warmup
    trainer = trainer_for(a, os.path.abspath(args.dir), mode, proxy, None, "warmup")
    trainer.fit(model, train_dataloaders=loader(batches[:args.warmup]))
    del model, trainer
    peer.trim_memory()


def main():
    ap = argparse.ArgumentParser(
        description="Checkpoint cost in a Lightning Trainer, per CheckpointIO plugin "
                    "(see the module docstring for every measure)")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, required=True)
    ap.add_argument("--dir", required=True, help="where checkpoints go (DIR/<mode>/)")
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--modes", default=",".join(ALL_MODES))
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of all modes; every other round runs them in reverse")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps before mode 1")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    args = ap.parse_args()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (known: {', '.join(ALL_MODES)})")
    if min(args.every, args.steps, args.layers, args.hidden, args.batch, args.rounds) <= 0:
        ap.error("--steps, --every, --layers, --hidden, --batch and --rounds must be positive")

    torch.set_num_threads(args.threads)
    os.makedirs(args.dir, exist_ok=True)
    malloc_fixed = peer.fix_malloc()
    import lightning

    quiet_lightning()

    classes = make_classes()
    proxy_cls = make_proxy_class()
    batches = make_data(args)
    if args.warmup > 0:
        warm_up(args, batches, classes, proxy_cls)

    sampler = peer.RssSampler()
    merged = {m: None for m in modes}
    order_log = []
    try:
        for rnd in range(args.rounds):
            order = modes if rnd % 2 == 0 else list(reversed(modes))
            order_log.append(order)
            for m in order:
                log(f"round {rnd + 1}/{args.rounds}: {m} ...")
                r = run_mode(m, args, batches, sampler, classes, proxy_cls)
                if "error" in r:
                    log(f"{m}: error {r['error']}")
                else:
                    st = [round(s, 1) for s in r["stalls_ms"]]
                    log(f"{m}: wall {r['wall_s']:.2f} s (drain {r['drain_s']:.2f}), median step "
                        f"{statistics.median(r['step_ms']):.1f} ms, stalls {st} ms, "
                        f"M0 {r.get('m0_ms', float('nan')):.1f} ms, peak RSS "
                        f"+{r['peak_rss_extra_mib']:.0f} MiB, verified {r['verified']}")
                merged[m] = merge(merged[m], r, rnd * args.steps)
    finally:
        sampler.close()

    results = [merged[m] for m in modes]
    m0s = [x for r in results if "error" not in r for x in r["m0_ms_rounds"]]
    clones = [x for r in results if "error" not in r for x in r["clone_ms_rounds"]]
    out = {
        "modes": results,
        "m0_s": statistics.median(m0s) / 1e3 if m0s else None,
        "clone_s": statistics.median(clones) / 1e3 if clones else None,
        "torch_version": torch.__version__,
        "lightning_version": lightning.__version__,
        "ckptio_package": ckptio_source(),
        "threads": torch.get_num_threads(),
        "python_version": sys.version.split()[0],
        "order": order_log,
        "config": {"layers": args.layers, "hidden": args.hidden, "batch": args.batch,
                   "steps": args.steps, "every": args.every, "seed": args.seed,
                   "rounds": args.rounds, "warmup": args.warmup, "verify": args.verify},
        "notes": {
            "m0_s": "median over every checkpoint mode and round of M0 (copy_ of the last "
                    "checkpoint's tensors into warm tensors, median of 5)",
            "peak_rss_extra_mib": "max over rounds; malloc mmap threshold fixed at 128 KiB: "
                                  f"{malloc_fixed}",
        },
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(peer._finite(out), f, indent=1, allow_nan=False, default=str)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
