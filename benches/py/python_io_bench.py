#!/usr/bin/env python3
"""ckptio's Python package against torch.save / torch.load, side by side in one run.

Usage: python_io_bench.py [--size-mib 1024] [--tensors 48] [--rounds 3] [--dir DIR] [--no-docs]
(`./dev.sh pybench ARGS` builds the package first, then runs this.)

One state dict of --size-mib MiB of float32 tensors in --tensors tensors (sizes spread like a
model's: a few large, many small), saved and loaded by each method in turn, --rounds rounds, the
order of the methods reversed every other round so that neither always runs first. Reported:
the median time of each, and the ratios the issue's goals are stated in:

  save:  ckptio.save(obj, p) (durable: file and directory fsynced) against
         torch.save(obj, p) + fsync of the file and of its directory (the same durability);
         D0 = writing the same bytes with one write() + fsync, for scale.
  load:  ckptio.load(p) (CRC-32s checked, the default; and without, like torch.load, which
         checks none) against torch.load(p, weights_only=True), and the same with mmap=True
         (each load then reads one byte of every 4 KiB page, so that a lazy map pays for its
         reads). Each load runs three ways: "warm", both files read once before (page cache);
         "cold", both files evicted from the page cache first (posix_fadvise DONTNEED, after an
         fsync); and "new process": warm, but loaded by a new Python process (timed in it,
         imports excluded), as when a job resumes, whose memory is all first touched.
  peak:  peak extra RSS of ckptio.AsyncCheckpointIO over a save (sampled every millisecond),
         per byte of state: one staging copy per save in flight (here one) is 1.0.

Every loaded state is checked equal to the saved one. With docs on (the default), the section
`python_io` of docs/benchmarks.md is rewritten with the table, the command, the commit and the
machine.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

import ckptio

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MIB = 1 << 20


def make_state(size_mib, tensors):
    """A state dict of float32 tensors summing to size_mib MiB; sizes fall geometrically."""
    weights = [0.8**i for i in range(tensors)]
    total = sum(weights)
    elems = [max(1, int(size_mib * MIB / 4 * w / total)) for w in weights]
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(n, generator=g) for i, n in enumerate(elems)}


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_durable(obj, path):
    torch.save(obj, path)
    fsync_path(path)
    fsync_path(os.path.dirname(path))


def raw_write(data, path):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(os.path.dirname(path))


def drop_file(path):
    if os.path.exists(path):
        os.unlink(path)


def read_through(path):
    """Brings the whole file into the page cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def evict(path):
    """Drops the file's pages from the page cache (they are clean: the file was fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def touched(state):
    """Reads one byte of every 4 KiB page of every tensor, as a training step would read them."""
    for t in state.values():
        flat = t.view(-1).view(torch.uint8)
        flat[::4096].sum()
    return state


NEW_PROCESS = {
    "ckptio.load": "ckptio.load(p)",
    "ckptio.load, no CRC": "ckptio.load(p, verify_crc=False)",
    "torch.load": "torch.load(p, weights_only=True)",
    "ckptio.load mmap + touch": "touched(ckptio.load(p, mmap=True))",
    "torch.load mmap + touch": "touched(torch.load(p, weights_only=True, mmap=True))",
}


def in_new_process(name, path):
    """Seconds a new Python process takes to load `path` the way `name` does (imports not
    counted)."""
    code = (
        f"import sys, time; sys.path.insert(0, {HERE!r}); import torch, ckptio; "
        f"from python_io_bench import touched; torch.set_num_threads(1); p = {path!r}; "
        f"t = time.perf_counter(); {NEW_PROCESS[name]}; print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def check_equal(a, b, what):
    if list(a) != list(b) or not all(torch.equal(a[k], b[k]) for k in a):
        raise SystemExit(f"{what}: the loaded state differs from the saved one")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_rss(state, path):
    """Peak RSS above the start while ckptio.AsyncCheckpointIO saves `state` once, per byte of
    state."""
    plugin = ckptio.AsyncCheckpointIO()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    start = rss()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    plugin.save_checkpoint(state, path)
    plugin.teardown()
    stop.set()
    sampler.join()
    check_equal(state, torch.load(path, weights_only=True), "AsyncCheckpointIO")
    return (peak[0] - start) / nbytes


def run(args, d):
    state = make_state(args.size_mib, args.tensors)
    p = {m: os.path.join(d, f"{m}.pt") for m in ("ckptio", "torch", "raw")}
    raw = bytes(args.size_mib * MIB)
    saves = {"ckptio.save": [], "torch.save + fsync": [], "D0 (write + fsync)": []}
    load_fns = [
        ("ckptio.load", lambda: ckptio.load(p["ckptio"]), p["ckptio"]),
        ("ckptio.load, no CRC", lambda: ckptio.load(p["ckptio"], verify_crc=False), p["ckptio"]),
        ("torch.load", lambda: torch.load(p["torch"], weights_only=True), p["torch"]),
        ("ckptio.load mmap + touch", lambda: touched(ckptio.load(p["ckptio"], mmap=True)), p["ckptio"]),
        ("torch.load mmap + touch", lambda: touched(torch.load(p["torch"], weights_only=True, mmap=True)), p["torch"]),
    ]
    caches = ("warm", "cold", "new process")
    loads = {f"{name}, {cache}": [] for cache in caches for name, _, _ in load_fns}
    save_fns = [
        ("ckptio.save", lambda: ckptio.save(state, p["ckptio"])),
        ("torch.save + fsync", lambda: torch_save_durable(state, p["torch"])),
        ("D0 (write + fsync)", lambda: raw_write(raw, p["raw"])),
    ]
    # Round 0 is an untimed warm-up (allocators, huge pages, imports).
    for r in range(-1, args.rounds):
        order = 1 if r % 2 == 0 else -1
        for name, fn in save_fns[::order]:
            drop_file(p[{"ckptio.save": "ckptio", "torch.save + fsync": "torch"}.get(name, "raw")])
            secs, _ = timed(fn)
            if r >= 0:
                saves[name].append(secs)
        for cache in caches:
            for name, fn, path in load_fns[::order]:
                (evict if cache == "cold" else read_through)(path)
                if cache == "new process":
                    loads[f"{name}, {cache}"].append(in_new_process(name, path)) if r >= 0 else None
                    continue
                secs, loaded = timed(fn)
                if r >= 0:
                    loads[f"{name}, {cache}"].append(secs)
                check_equal(state, loaded, name)
                del loaded
        print(f"round {r + 1}/{args.rounds} done" if r >= 0 else "warm-up done", file=sys.stderr)
    peak = peak_extra_rss(state, os.path.join(d, "async.pt"))
    return saves, loads, peak


def table(saves, loads, peak, size_mib):
    med = {k: statistics.median(v) for k, v in {**saves, **loads}.items()}
    spread = {k: (min(v), max(v)) for k, v in {**saves, **loads}.items()}
    gb = size_mib * MIB / 1e9
    rows = ["| operation | median | GB/s | range of rounds |", "|---|---|---|---|"]
    for k in list(saves) + list(loads):
        lo, hi = spread[k]
        rows.append(f"| {k} | {med[k] * 1e3:.0f} ms | {gb / med[k]:.2f} | {lo * 1e3:.0f} to {hi * 1e3:.0f} ms |")
    def ratio(slow, fast):
        return med[slow] / med[fast]

    goals = [
        ("`ckptio.save` durable vs `torch.save` + fsync", ratio("torch.save + fsync", "ckptio.save"), 1.5),
    ]
    for cache in ("warm", "cold", "new process"):
        goals += [
            (f"`ckptio.load` vs `torch.load`, {cache} (CRC-32s checked: more than torch does)",
             ratio(f"torch.load, {cache}", f"ckptio.load, {cache}"), 2.0),
            (f"`ckptio.load` vs `torch.load`, {cache}, like for like (no CRC)",
             ratio(f"torch.load, {cache}", f"ckptio.load, no CRC, {cache}"), 2.0),
            (f"`ckptio.load(mmap=True)` vs `torch.load(mmap=True)`, {cache}, pages touched",
             ratio(f"torch.load mmap + touch, {cache}", f"ckptio.load mmap + touch, {cache}"), 1.0),
        ]
    rows += ["", "| goal | ratio (> 1: ckptio faster) | target | met |", "|---|---|---|---|"]
    for what, r, target in goals:
        rows.append(f"| {what} | {r:.2f}x | >= {target}x | {'yes' if r >= target else 'no'} |")
    rows.append(
        f"| peak extra RSS of `ckptio.AsyncCheckpointIO`, one save | {peak:.2f} x state | "
        f"one staging copy per save in flight (1.0) | {'yes' if peak <= 1.1 else 'no'} |"
    )
    return "\n".join(rows)


def git(*a):
    try:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return ""


def commit():
    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    changed = [l[3:] for l in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    dirty = any(not c.endswith(".md") and not c.startswith("docs/") for c in changed)
    return head + ("-dirty" if dirty else "")


def machine(d):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) / (1 << 20)
    fs = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {len(os.sched_getaffinity(0))} CPUs available to the process, {mem:.1f} GiB memory, "
            f"Linux {platform.release()}, torch {torch.__version__}, Python {platform.python_version()}; "
            f"checkpoints on {fs}")


def splice(doc, name, body):
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    b = doc.find(begin)
    e = doc.find(end, b) if b >= 0 else -1
    if b >= 0 and e >= 0:
        return f"{doc[:b]}{begin}\n{body}\n{doc[e:]}"
    return doc.rstrip("\n") + f"\n\n{begin}\n{body}\n{end}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory under target/)")
    ap.add_argument("--no-docs", dest="docs", action="store_false")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = args.dir or os.path.join(REPO, "target", "tmp")
    os.makedirs(base, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as d:
        saves, loads, peak = run(args, d)
        md = table(saves, loads, peak, args.size_mib)
        where = machine(d)
    print(md)
    if not args.docs:
        return
    cmd = "./dev.sh pybench " + " ".join(sys.argv[1:])
    body = (
        f"<!-- Written by `{cmd.strip()}`; edit benches/py/python_io_bench.py, not this section. -->\n"
        f"A state dict of {args.size_mib} MiB in {args.tensors} float32 tensors, {args.rounds} rounds.\n\n"
        f"{md}\n\n`{cmd.strip()}` at commit `{commit()}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {where}."
    )
    path = os.path.join(REPO, "docs", "benchmarks.md")
    with open(path) as f:
        doc = f.read()
    with open(path, "w") as f:
        f.write(splice(doc, "python_io", body))
    print(f"wrote the python_io section of {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
