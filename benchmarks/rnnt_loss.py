"""The RNN-T loss, forward + backward: looplift.rnnt_loss vs warprnnt-numba vs a plain PyTorch loop over t.

Random joint logits (float32, CPU) at (B, T, U, V) = (8, 200, 50, 64) and (16, 400, 80, 128), the entries'
frames and labels of different lengths (the first at the full size), computed three ways:

* looplift: ``ll.rnnt_loss`` in a compiled program (anti-diagonal dynamic programs, a backward pass over
  beta, the log-softmax fused);
* a plain PyTorch loop over t: alpha of frame t from frame t - 1 with a cumulative sum and a log-cumsum-exp
  over u (vectorized over the batch and u), the gradient by autograd (as a careful user writes it);
* warprnnt-numba (PyPI ``warprnnt-numba``, ``RNNTLossNumba``), in a virtual environment of its own that the
  script builds on first use (``benchmarks/_peer_venv.py``; ``$LOOPLIFT_WARPRNNT_VENV`` or
  ``~/.cache/looplift-bench/warprnnt-venv``), run in a subprocess on the same inputs.

The three losses and gradients are asserted equal. Peak memory: in a fresh subprocess, the most memory
(RSS) the loss's forward + backward needed beyond what the process held with the logits allocated, relative
to the logits tensor (the gradient alone is 1x). The last line is one JSON object with, per shape,
``vs_warprnnt`` and ``vs_plain_loop`` (their time / looplift's, medians) and ``peak_memory_vs_logits``. Goals:
>= 10x faster than warprnnt-numba, peak memory <= 2x the logits.

Run: ``python benchmarks/rnnt_loss.py [--repeats 3] [--no-warprnnt]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import looplift as ll

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer_venv import PeerUnavailable, ensure_venv  # noqa: E402  (the benchmarks' shared helper)

SHAPES = [(8, 200, 50, 64), (16, 400, 80, 128)]
B = ll.batch_dim

WARPRNNT_SIDE = r"""
import sys, time, torch
from warprnnt_numba.rnnt_loss import RNNTLossNumba
data = torch.load(sys.argv[1])
loss_fn = RNNTLossNumba(blank=0, reduction="none")
tiny = torch.randn(2, 3, 3, data["logits"].shape[-1], requires_grad=True)   # (numba compiles its kernels once,
loss_fn(tiny, torch.ones(2, 2, dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32),
        torch.tensor([2, 1], dtype=torch.int32)).sum().backward()           # untimed)
times, out = [], {}
for _ in range(int(sys.argv[3])):
    acts = data["logits"].clone().requires_grad_(True)
    start = time.perf_counter()
    loss = loss_fn(acts, data["labels"].int(), data["t_len"].int(), data["u_len"].int())
    loss.sum().backward()
    times.append(time.perf_counter() - start)
    out = {"loss": loss.detach(), "grad": acts.grad}
out["times"] = times
torch.save(out, sys.argv[2])
"""


def data(shape, seed: int = 0):
    b, t, u, v = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, u + 1, v, generator=g)
    labels = torch.randint(1, v, (b, u), generator=g)
    t_len = torch.randint(t // 2, t + 1, (b,), generator=g)
    u_len = torch.randint(u // 2, u + 1, (b,), generator=g)
    t_len[0], u_len[0] = t, u
    return logits, labels, t_len, u_len


def looplift_loss(x, labels, t_len, u_len):
    """Forward + backward with ll.rnnt_loss of the logits `x` (a leaf): (the losses, the gradient)."""
    enc, lab, vocab = ll.Dim("enc_time"), ll.Dim("labels"), ll.Dim("vocab", x.shape[-1])
    prog = ll.compile(lambda s, y: ll.rnnt_loss(s, y, blank=0, enc_time=enc, prefix=lab + 1, axis=vocab))
    loss = prog(ll.Named(x, (B, enc, lab + 1, vocab), {enc: t_len, lab: u_len}),
                ll.Named(labels, (B, lab), {lab: u_len}, sparse_dim=vocab)).tensor
    loss.sum().backward()
    return loss.detach(), x.grad


def plain_loop_loss(x, labels, t_len, u_len):
    """The same loss by a loop over t in plain PyTorch, autograd for the gradient: (the losses, the gradient)."""
    b, t, u1, _ = x.shape
    logp = torch.log_softmax(x, -1)
    blank = logp[..., 0]                                                    # (B, T, U1)
    label = logp[:, :, :-1].gather(-1, labels[:, None, :, None].expand(b, t, u1 - 1, 1)).squeeze(-1)
    # alpha(t, u) = c(u) + logcumsumexp_k(alpha(t-1, k) + blank(t-1, k) - c(k)), c(u) = sum_{j<u} label(t, j)
    alphas = []
    prev = None
    for ti in range(t):
        c = torch.cat([label.new_zeros(b, 1), label[:, ti].cumsum(1)], 1)    # (B, U1)
        start = torch.full((b, u1), float("-inf"))
        start[:, 0] = 0.0
        a = start if prev is None else prev + blank[:, ti - 1]
        prev = c + torch.logcumsumexp(a - c, 1)
        alphas.append(prev)
    alpha = torch.stack(alphas, 1)                                          # (B, T, U1)
    rows = torch.arange(b)
    loss = -(alpha[rows, t_len - 1, u_len] + blank[rows, t_len - 1, u_len])
    loss.sum().backward()
    return loss.detach(), x.grad


def timed(fn, inputs, repeats: int):
    """Median seconds of forward + backward, each on fresh leaf logits; the last (losses, gradient)."""
    times, out = [], None
    for _ in range(repeats):
        x = inputs[0].clone().requires_grad_(True)
        start = time.perf_counter()
        out = fn(x, *inputs[1:])
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


PEAK_SIDE = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from rnnt_loss import data, looplift_loss, plain_loop_loss
shape = tuple(int(v) for v in sys.argv[2].split(","))
fn = {"looplift": looplift_loss, "plain_loop": plain_loop_loss}[sys.argv[3]]
logits, labels, t_len, u_len = data(shape)
tiny = data((2, 3, 2, shape[3]))
fn(tiny[0].requires_grad_(True), *tiny[1:])   # (the code paths loaded once, on a tiny lattice)
logits.requires_grad_(True)

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                          # resets the peak resident size (VmHWM) to the current one
before = status("VmRSS:")
fn(logits, labels, t_len, u_len)
print((status("VmHWM:") - before) / (logits.numel() * logits.element_size()))
"""


def peak_memory(shape, which: str) -> float:
    """The peak memory the loss's forward + backward needs beyond the process with the logits, relative to
    the logits, measured in a fresh process (RSS)."""
    done = subprocess.run([sys.executable, "-c", PEAK_SIDE, str(Path(__file__).resolve().parent),
                           ",".join(map(str, shape)), which], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def warprnnt(shape, inputs, repeats: int):
    """warprnnt-numba in its venv: (median seconds, losses, gradient)."""
    py = ensure_venv("warprnnt", "LOOPLIFT_WARPRNNT_VENV", "warprnnt-venv", [["warprnnt-numba", "numba", "numpy",
                                                                              "packaging"]],
                     "from warprnnt_numba.rnnt_loss import RNNTLossNumba")
    logits, labels, t_len, u_len = inputs
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"logits": logits, "labels": labels, "t_len": t_len, "u_len": u_len}, src)
        done = subprocess.run([str(py), "-c", WARPRNNT_SIDE, str(src), str(dst), str(repeats)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise PeerUnavailable(f"warprnnt-numba failed: {done.stderr.strip().splitlines()[-1:]}")
        out = torch.load(dst)
    return statistics.median(out["times"]), out["loss"], out["grad"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warprnnt-repeats", type=int, default=1, help="(it takes minutes at the larger shape)")
    parser.add_argument("--no-warprnnt", action="store_true")
    args = parser.parse_args()
    results = {}
    for shape in SHAPES:
        inputs = data(shape)
        key = "x".join(map(str, shape))
        t_ll, (loss, grad) = timed(looplift_loss, inputs, args.repeats)
        t_loop, (loss_loop, grad_loop) = timed(plain_loop_loss, inputs, args.repeats)
        # (float32 over hundreds of steps: the plain loop's own rounding is about 1e-4 in the probabilities)
        torch.testing.assert_close(loss, loss_loop, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(grad, grad_loop, rtol=0, atol=2e-3)
        entry = {"looplift_s": round(t_ll, 4), "plain_loop_s": round(t_loop, 4),
                 "vs_plain_loop": round(t_loop / t_ll, 2)}
        if not args.no_warprnnt:
            try:
                t_w, loss_w, grad_w = warprnnt(shape, inputs, args.warprnnt_repeats)
                torch.testing.assert_close(loss, loss_w, rtol=1e-5, atol=1e-3)
                torch.testing.assert_close(grad, grad_w, rtol=0, atol=2e-3)
                entry.update(warprnnt_s=round(t_w, 3), vs_warprnnt=round(t_w / t_ll, 1))
            except PeerUnavailable as e:
                print(f"[warprnnt] not compared: {e}", file=sys.stderr)
                entry.update(vs_warprnnt=None, warprnnt_reason=str(e))
        entry["peak_memory_vs_logits"] = round(peak_memory(shape, "looplift"), 2)
        entry["plain_loop_peak_memory_vs_logits"] = round(peak_memory(shape, "plain_loop"), 2)
        print(f"{key}: losses and gradients equal; {json.dumps(entry)}", flush=True)
        results[key] = entry
    print(json.dumps(results))


if __name__ == "__main__":
    main()
