#!/usr/bin/env python3
"""lossc against PyTorch eager, torch.compile and jax.jit(jax.value_and_grad), side by side.

For each loss and thread count: the median forward+backward time (gradient of the first
input) of each peer, next to `lossc bench --json` run in the same invocation at the same
shapes and thread counts, and the ratios peer / lossc. Before timing, every peer's value
and gradient are checked against `lossc eval` on the same inputs, so the comparison is of
the same loss.

The peers are written here from the formulas in the stdlib's documentation
(`lossc list`, stdlib/*.loss), not from lossc's code. Lovász uses Berman et al.'s
`lovasz_grad` (sort, cumsum, difference of running Jaccards), as their reference does.

Each thread count runs in its own child process: the affinity mask and the thread
variables of OpenMP, MKL and XLA must be set before torch and jax are imported.

Not run in CI. See bench/README.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = ["dice", "tversky", "focal_tversky", "combo", "dice_bce", "bce_logits", "focal", "dice_multiclass", "lovasz_hinge"]
# Losses whose first input is logits x; the others take probabilities p.
LOGITS = {"dice_bce", "bce_logits", "focal", "dice_multiclass", "lovasz_hinge"}
MULTICLASS = {"dice_multiclass"}
SORTS = {"lovasz_hinge"}
# "lossc.torch" and "lossc.jax" are lossc itself as PyTorch and JAX users call it
# (python/lossc, on the release liblossc): their ratios are what the Python layer, the
# framework and a fresh gradient per call add to the bare kernels.
PEERS = ["eager", "compile", "jax", "lossc.torch", "lossc.jax"]
DEFAULT_PEERS = PEERS


# ---------------------------------------------------------------- the losses, once per framework


class Ops:
    """The few array operations the losses need, in PyTorch or in jax.numpy."""

    def __init__(self, kind):
        self.kind = kind
        if kind == "torch":
            import torch
            import torch.nn.functional as F

            self.m = torch
            self.sigmoid = torch.sigmoid
            self.softplus = F.softplus
            self.log = torch.log
            self.relu = torch.relu
            self.clip = torch.clamp
            self.softmax_class = lambda x: torch.softmax(x, dim=1)
            self.cumsum = lambda a: torch.cumsum(a, 0)
            self.cat = torch.cat
            self.sum = lambda a, axes=None: a.sum() if axes is None else a.sum(dim=axes)
            self.mean = lambda a: a.mean()
            self.flat = lambda a: a.reshape(-1)

            def sort_desc(e, g):
                order = torch.argsort(e, descending=True)
                return e[order], g[order]

            self.sort_desc = sort_desc
        else:
            import jax
            import jax.numpy as jnp

            self.m = jnp
            self.sigmoid = jax.nn.sigmoid
            self.softplus = jax.nn.softplus
            self.log = jnp.log
            self.relu = jax.nn.relu
            self.clip = jnp.clip
            self.softmax_class = lambda x: jax.nn.softmax(x, axis=1)
            self.cumsum = jnp.cumsum
            self.cat = jnp.concatenate
            self.sum = lambda a, axes=None: jnp.sum(a, axis=axes)
            self.mean = jnp.mean
            self.flat = jnp.ravel

            def sort_desc(e, g):
                order = jnp.argsort(-e)
                return e[order], g[order]

            self.sort_desc = sort_desc


def losses(o):
    """Each loss as f(first, y), from the formulas of the stdlib docs, default hyperparameters."""

    def dice(p, y, smooth=1.0):
        return 1 - (2 * o.sum(p * y) + smooth) / (o.sum(p) + o.sum(y) + smooth)

    def tversky(p, y, alpha=0.5, beta=0.5, smooth=1.0):
        tp = o.sum(p * y)
        fp = o.sum(p * (1 - y))
        fn = o.sum((1 - p) * y)
        return 1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)

    def focal_tversky(p, y, gamma=1.0):
        return tversky(p, y) ** gamma

    def combo(p, y, alpha=0.5, ce_ratio=0.5, smooth=1.0, eps=1e-7):
        pc = o.clip(p, eps, 1 - eps)
        ce = o.mean(-(alpha * y * o.log(pc) + (1 - alpha) * (1 - y) * o.log(1 - pc)))
        dc = (2 * o.sum(p * y) + smooth) / (o.sum(p) + o.sum(y) + smooth)
        return ce_ratio * ce - (1 - ce_ratio) * dc

    def bce_elements(x, y):
        return y * o.softplus(-x) + (1 - y) * o.softplus(x)

    def bce_logits(x, y):
        return o.mean(bce_elements(x, y))

    def dice_bce(x, y):
        return bce_logits(x, y) + dice(o.sigmoid(x), y)

    def focal(x, y, alpha=0.25, gamma=2.0):
        q = o.sigmoid(x) * (1 - y) + o.sigmoid(-x) * y
        alpha_t = alpha * y + (1 - alpha) * (1 - y)
        return o.mean(alpha_t * q**gamma * bce_elements(x, y))

    def dice_multiclass(x, y, smooth=1.0):
        p = o.softmax_class(x)
        axes = (0, 2)  # statistics per class over (batch, spatial)
        d = (2 * o.sum(p * y, axes) + smooth) / (o.sum(p, axes) + o.sum(y, axes) + smooth)
        return 1 - o.mean(d)

    def lovasz_grad(g):
        # Berman et al.'s lovasz_grad: differences of the running Jaccard index.
        gts = o.sum(g)
        intersection = gts - o.cumsum(g)
        union = gts + o.cumsum(1 - g)
        jaccard = 1 - intersection / union
        return o.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])

    def lovasz_hinge(x, y):
        x, y = o.flat(x), o.flat(y)
        e = 1 - x * (2 * y - 1)
        e_sorted, g_sorted = o.sort_desc(e, y)
        return o.sum(o.relu(e_sorted) * lovasz_grad(g_sorted))

    return {
        "dice": dice,
        "tversky": tversky,
        "focal_tversky": focal_tversky,
        "combo": combo,
        "dice_bce": dice_bce,
        "bce_logits": bce_logits,
        "focal": focal,
        "dice_multiclass": dice_multiclass,
        "lovasz_hinge": lovasz_hinge,
    }


# ---------------------------------------------------------------- inputs


def make_inputs(loss, shape, seed):
    """float32 inputs like lossc's synthetic ones: logits 1.5 N(0, 1) or probabilities
    U(0.02, 0.98); binary targets with 40% ones, or one-hot over the class axis."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, c, s = shape
    if loss in LOGITS:
        first = (1.5 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    else:
        first = rng.uniform(0.02, 0.98, size=shape).astype(np.float32)
    if c > 1:
        y = np.zeros(shape, dtype=np.float32)
        labels = rng.integers(0, c, size=(b, s))
        np.put_along_axis(y, labels[:, None, :], 1.0, axis=1)
    else:
        y = (rng.random(shape, dtype=np.float32) < 0.4).astype(np.float32)
    return first, y


def count(text):
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def check_shape(loss, n):
    return [4, 5, max(n // 20, 1)] if loss in MULTICLASS else [1, 1, n]


# ---------------------------------------------------------------- the child: one thread count


def limit_threads(threads):
    """Pins this process to `threads` cores. The environment was set by the parent."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(cores[:threads]))


def median_ms(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def peer_fns(peer, loss, first, y):
    """A callable doing forward+backward of `loss` w.r.t. the first input, and one
    returning (value, gradient) as numpy."""
    import numpy as np

    if peer in ("eager", "compile", "lossc.torch"):
        import torch

        if peer == "lossc.torch":
            import lossc.torch

            f = lossc.torch.Loss(loss)
        else:
            f = losses(Ops("torch"))[loss]
            if peer == "compile":
                f = torch.compile(f, dynamic=False)
        xt = torch.from_numpy(first).requires_grad_(True)
        yt = torch.from_numpy(y)

        def step():
            value = f(xt, yt)
            (grad,) = torch.autograd.grad(value, xt)
            return value, grad

        def result():
            value, grad = step()
            return float(value), grad.numpy()

        return step, result
    import jax

    if peer == "lossc.jax":
        import lossc.jax

        f = lossc.jax.function(loss)
    else:
        f = losses(Ops("jax"))[loss]
    vg = jax.jit(jax.value_and_grad(f))
    xj, yj = jax.device_put(first), jax.device_put(y)

    def step():
        return jax.block_until_ready(vg(xj, yj))

    def result():
        value, grad = step()
        return float(value), np.asarray(grad)

    return step, result


def child(args):
    limit_threads(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    jobs = json.loads(Path(args.jobs).read_text())
    out = []
    for job in jobs["checks"]:
        # Same inputs as `lossc eval` saw; compare value and gradient.
        first, y = np.load(job["first"]), np.load(job["y"])
        want_grad = np.load(job["grad"]) if job.get("grad") else None
        for peer in args.peers:
            row = {"check": job["loss"], "peer": peer}
            try:
                _, result = peer_fns(peer, job["loss"], first, y)
                value, grad = result()
                row["value"] = value
                row["value_rel"] = abs(value - job["value"]) / max(abs(job["value"]), 1e-30)
                if want_grad is not None:
                    scale = float(np.linalg.norm(want_grad.astype(np.float64))) or 1.0
                    row["grad_rel"] = float(np.linalg.norm((grad - want_grad).astype(np.float64))) / scale
            except Exception as e:  # a peer that cannot run a loss is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            out.append(row)
    for job in jobs["timings"]:
        loss, shape = job["loss"], job["shape"]
        first, y = make_inputs(loss, shape, seed=7)
        runs = args.sort_runs if loss in SORTS else args.runs
        for peer in args.peers:
            row = {"loss": loss, "shape": shape, "threads": args.threads, "peer": peer, "runs": runs}
            try:
                step, _ = peer_fns(peer, loss, first, y)
                # torch.compile and jax.jit compile on the first call: two warm-up calls.
                row["median_ms"] = median_ms(step, runs, warmup=2)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            out.append(row)
            print(f"  {args.threads} thread(s): {loss} {peer}: {row.get('median_ms', row.get('error'))}",
                  file=sys.stderr, flush=True)
    print(json.dumps({"versions": versions()}))
    for row in out:
        print(json.dumps(row))


def versions():
    import jax
    import numpy
    import torch

    return {"torch": torch.__version__, "jax": jax.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0]}


# ---------------------------------------------------------------- the parent


def child_env(threads, library_dir):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(threads)
    multi = "true" if threads > 1 else "false"
    env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen={multi} intra_op_parallelism_threads={threads}"
    env["JAX_PLATFORMS"] = "cpu"
    # The lossc.torch peer: the package from python/ on the release library beside --lossc.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "python"), env.get("PYTHONPATH")]))
    env["LOSSC_LIBRARY"] = str(Path(library_dir) / "liblossc.so")
    return env


def run_lossc_bench(args):
    cmd = [args.lossc, "bench", *args.losses, "--threads", ",".join(map(str, args.threads)),
           "--runs", str(args.runs), "--no-baseline", "--json"]
    if args.sizes:
        cmd += ["--sizes", ",".join(args.sizes)]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if not rows:
        sys.exit(f"lossc bench printed nothing:\n{done.stderr}")
    return rows


def lossc_eval(args, loss, first_path, y_path, grad_path):
    """Value and gradient of `loss` by `lossc eval` (the native runtime; the f64
    interpreter where the runtime cannot run the loss yet)."""
    name = "p" if loss not in LOGITS else "x"
    base = [args.lossc, "eval", loss, "--input", f"{name}={first_path}", "--input", f"y={y_path}",
            "--grad", f"{name}={grad_path}"]
    for backend in ("jit", "interp"):
        done = subprocess.run(base + ["--backend", backend], capture_output=True, text=True)
        if done.returncode == 0:
            return float(done.stdout.strip().splitlines()[-1]), backend
    sys.exit(f"lossc eval {loss} failed:\n{done.stderr}")


def parent(args):
    import numpy as np

    bench_rows = run_lossc_bench(args)
    shapes = []
    for r in bench_rows:
        if (r["loss"], r["shape"]) not in shapes:
            shapes.append((r["loss"], r["shape"]))
    tmp = Path(tempfile.mkdtemp(prefix="lossc-peers-"))
    checks = []
    for loss in args.losses:
        shape = check_shape(loss, count(args.check_size))
        first, y = make_inputs(loss, shape, seed=11)
        paths = {k: tmp / f"{loss}-{k}.npy" for k in ("first", "y", "grad")}
        np.save(paths["first"], first)
        np.save(paths["y"], y)
        value, backend = lossc_eval(args, loss, paths["first"], paths["y"], paths["grad"])
        checks.append({"loss": loss, "shape": shape, "value": value, "backend": backend,
                       **{k: str(p) for k, p in paths.items()}})
    peer_rows, version = [], None
    for i, threads in enumerate(args.threads):
        jobs = tmp / f"jobs-{threads}.json"
        timings = [{"loss": l, "shape": s} for l, s in shapes]
        jobs.write_text(json.dumps({"checks": checks if i == 0 else [], "timings": timings}))
        cmd = [sys.executable, __file__, "--child", "--jobs", str(jobs), "--threads-one", str(threads),
               "--runs", str(args.runs), "--sort-runs", str(args.sort_runs), "--peers", ",".join(args.peers)]
        done = subprocess.run(cmd, env=child_env(threads, Path(args.lossc).parent), stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"the {threads}-thread child failed")
        for line in done.stdout.splitlines():
            row = json.loads(line)
            if "versions" in row:
                version = row["versions"]
            else:
                peer_rows.append(row)
    report(args, bench_rows, peer_rows, checks, version)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def report(args, bench_rows, peer_rows, checks, version):
    print(f"lossc vs peers: forward+backward (gradient of the first input), median ms; "
          f"ratios are peer time / lossc time (above 1: lossc is faster)")
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores available")
    if version:
        print("versions: " + ", ".join(f"{k} {v}" for k, v in version.items()))
    print("command: python3 bench/peers.py " + " ".join(sys.argv[1:]) + "\n")
    print("same loss? value and gradient against `lossc eval` on the same inputs "
          f"({args.check_size} elements; rel = |peer - lossc| / |lossc|, gradient in L2)")
    print(f"{'loss':<16} {'lossc':>6} " + " ".join(f"{p + ' value':>14} {p + ' grad':>13}" for p in args.peers))
    for c in checks:
        cells = []
        for p in args.peers:
            r = next((r for r in peer_rows if r.get("check") == c["loss"] and r["peer"] == p), {})
            if "error" in r:
                cells.append(f"{'error':>14} {'':>13}")
            else:
                cells.append(f"{r.get('value_rel', float('nan')):>14.1e} {r.get('grad_rel', float('nan')):>13.1e}")
        print(f"{c['loss']:<16} {c['backend']:>6} " + " ".join(cells))
    print()
    names = {"eager": "eager", "compile": "torch.compile", "jax": "jax.jit", "lossc.torch": "lossc.torch",
             "lossc.jax": "lossc.jax"}
    rows = []
    for r in bench_rows:
        mine = r.get("median_ms")
        times, ratios = [], []
        for p in args.peers:
            q = next((q for q in peer_rows if q.get("loss") == r["loss"] and q["shape"] == r["shape"]
                      and q["threads"] == r["threads"] and q["peer"] == p), {})
            t = q.get("median_ms")
            times.append(f"{t:.1f}" if t is not None else "error")
            ratios.append(f"{t / mine:.2f}" if t is not None and mine else "-")
        shape = "x".join(map(str, r["shape"]))
        rows.append([r["loss"], shape, str(r["threads"]), f"{mine:.1f}" if mine is not None else "error"] + times + ratios)
    head = ["loss", "shape", "thr", "lossc ms"] + [names[p] + " ms" for p in args.peers]
    head += [names[p] + " / lossc" for p in args.peers]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        for row in [head] + rows:
            print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    errors = [r for r in bench_rows if "error" in r] + [r for r in peer_rows if "error" in r]
    for r in errors:
        who = r.get("peer", "lossc")
        print(f"note: {r.get('loss', r.get('check'))} ({who}): {r['error']}")


def main():
    default_lossc = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "lossc"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("losses", nargs="*", default=SUITE, help=f"losses (default: {' '.join(SUITE)})")
    ap.add_argument("--sizes", type=lambda s: s.split(","), default=[],
                    help="as lossc bench --sizes (default: lossc's suite sizes)")
    ap.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2])
    ap.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median)")
    ap.add_argument("--sort-runs", type=int, default=3, help="timed runs for sorting losses (slow in the peers)")
    ap.add_argument("--peers", type=lambda s: s.split(","), default=DEFAULT_PEERS,
                    help="from eager,compile,jax,lossc.torch,lossc.jax (default: all)")
    ap.add_argument("--check-size", default="64K", help="elements of the value/gradient check")
    ap.add_argument("--markdown", action="store_true", help="print the timing table as Markdown (for the README)")
    ap.add_argument("--lossc", default=str(default_lossc), help="the lossc binary")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--threads-one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [l for l in args.losses if l not in SUITE] + [p for p in args.peers if p not in PEERS]
    if unknown:
        sys.exit(f"no peer implementation of: {', '.join(unknown)} (losses: {', '.join(SUITE)}; peers: {', '.join(PEERS)})")
    if args.child:
        args.threads = args.threads_one
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
