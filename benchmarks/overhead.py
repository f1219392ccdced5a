"""The per-step overhead of a looplift Program against the same model written by hand in PyTorch.

The model is a stack of pre-norm feed-forward blocks, ``x + FeedForward(LayerNorm(x))``,
over (batch, time, feature) with dynamic lengths, ending in the mean over the
valid frames. Both versions share the same weights; a step is forward plus
backward. Steps alternate between the two (so drift in the machine's speed hits
both alike), and the median step times are compared.

It also reports what checking label inputs against their vocabulary costs: the time spent in the check
during looplift's steps (this model has no label input: the check finds none), and the check of a label
input over (batch, time) with a 1000-label vocabulary, timed on its own, as a share of the median step.

Run: ``python benchmarks/overhead.py [--batch 32 --time 100 --feature 256 --hidden 1024 --steps 30]``.
The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import looplift as ll
import looplift.program as _program

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _label_check import LabelCheckTimer  # noqa: E402  (the benchmarks' shared helper)

B = ll.batch_dim


class Block(ll.Module):
    def __init__(self, feat: ll.Dim, hidden: ll.Dim):
        super().__init__()
        self.norm = ll.nn.LayerNorm(feat)
        self.ff = ll.nn.FeedForward(feat, hidden)

    def forward(self, x):
        return x + self.ff(self.norm(x))


class Model(ll.Module):
    def __init__(self, feat: ll.Dim, hidden: ll.Dim, n_blocks: int):
        super().__init__()
        self.feat = feat
        self.blocks = torch.nn.ModuleList([Block(feat, hidden) for _ in range(n_blocks)])

    def forward(self, x, *, time: ll.Dim):
        for block in self.blocks:
            x = block(x)
        return ll.mean(x, axis=(B, time, self.feat))


class TorchBlock(torch.nn.Module):
    def __init__(self, feat: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(feat)
        self.up = torch.nn.Linear(feat, hidden)
        self.down = torch.nn.Linear(hidden, feat)

    def forward(self, x):
        return x + self.down(F.relu(self.up(self.norm(x))))


class TorchModel(torch.nn.Module):
    """The model as a PyTorch user writes it, with the looplift model's weights copied over."""

    def __init__(self, model: Model):
        super().__init__()
        feat, hidden = model.feat.size, model.blocks[0].ff.up.out_dim.size
        self.blocks = torch.nn.ModuleList([TorchBlock(feat, hidden) for _ in model.blocks])
        with torch.no_grad():
            for mine, theirs in zip(self.blocks, model.blocks):
                for dst, src in [(mine.norm, theirs.norm), (mine.up, theirs.ff.up), (mine.down, theirs.ff.down)]:
                    dst.weight.copy_(src.weight)
                    dst.bias.copy_(src.bias)

    def forward(self, x, lengths):
        for block in self.blocks:
            x = block(x)
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        return (x * mask).sum() / (mask.sum() * x.shape[-1])


def step(model: torch.nn.Module, run) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    loss = run()
    loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds, loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--time", type=int, default=100)
    parser.add_argument("--feature", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each version")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each version first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_dim, feat, hidden = ll.Dim("time"), ll.Dim("feature", args.feature), ll.Dim("hidden", args.hidden)
    model = Model(feat, hidden, args.blocks).to(device)
    ref = TorchModel(model).to(device)

    x = torch.randn(args.batch, args.time, args.feature, device=device)
    lengths = torch.randint(args.time // 2, args.time + 1, (args.batch,), device=device)
    lengths[0] = args.time
    named = ll.Named(x, (B, t_dim, feat), lengths={t_dim: lengths})

    prog = ll.compile(model, mode="train")
    trace = prog.trace(ll.Spec((B, t_dim, feat)), time=t_dim)

    def run_looplift():
        out = prog(named, time=t_dim).tensor
        sync()
        return out

    def run_torch():
        out = ref(x, lengths)
        sync()
        return out

    def timed(m, run):
        seconds, loss = step(m, run)
        sync()
        return seconds, loss

    for _ in range(args.warmup):
        timed(model, run_looplift)
        timed(ref, run_torch)
    times_ll, times_torch = [], []
    checks = LabelCheckTimer()
    for _ in range(args.steps):
        with checks:
            s, loss_ll = timed(model, run_looplift)
        times_ll.append(s)
        s, loss_torch = timed(ref, run_torch)
        times_torch.append(s)

    assert len(prog.traces) == 1, "the program was traced again"
    assert torch.allclose(loss_ll, loss_torch, rtol=1e-5, atol=1e-6), (loss_ll.item(), loss_torch.item())

    med_ll, med_torch = statistics.median(times_ll), statistics.median(times_torch)
    ratio = med_ll / med_torch
    label_check = _label_check_seconds(args.batch, args.time, lengths, device)
    print(f"model: {args.blocks} x (x + FeedForward(LayerNorm(x))), masked mean loss; "
          f"batch {args.batch}, time {args.time} (lengths {int(lengths.min())}..{int(lengths.max())}), "
          f"feature {args.feature}, hidden {args.hidden}, {device}, {torch.get_num_threads()} threads")
    print(f"loss: looplift {loss_ll.item():.8f}, torch {loss_torch.item():.8f}")
    print(f"trace + prepare: {trace.seconds * 1e3:.2f} ms, {trace.num_nodes} nodes per call")
    print(f"forward + backward, median of {args.steps} steps: looplift {med_ll * 1e3:.2f} ms "
          f"(min {min(times_ll) * 1e3:.2f}), torch {med_torch * 1e3:.2f} ms (min {min(times_torch) * 1e3:.2f}); "
          f"ratio {ratio:.3f}")
    print(f"label check: {1e3 * checks.seconds / args.steps:.4f} ms per call in these steps "
          f"({100 * checks.seconds / sum(times_ll):.3f}% of looplift's step); a (batch, time) label input of "
          f"a 1000-label vocabulary: {1e3 * label_check:.3f} ms per call, {100 * label_check / med_ll:.2f}% of "
          f"the median step")
    print(json.dumps({"program_vs_torch": round(ratio, 4), "trace_compile_ms": round(trace.seconds * 1e3, 3),
                      "nodes": trace.num_nodes, "batch": args.batch, "time": args.time,
                      "label_check_share": round(checks.seconds / sum(times_ll), 6),
                      "label_input_check_share": round(label_check / med_ll, 5),
                      "feature": args.feature}))


def _label_check_seconds(batch: int, frames: int, lengths: torch.Tensor, device, repeats: int = 200) -> float:
    """The median time of checking one (batch, time) label input of a 1000-label vocabulary at a call."""
    t_dim, vocab = ll.Dim("time"), ll.Dim("vocab", 1000)
    labels = ll.Named(torch.randint(0, 1000, (batch, frames), device=device), (B, t_dim), {t_dim: lengths},
                      sparse_dim=vocab)
    env = _program._make_env([labels], None, _program._CALL_SITE)   # (the check itself runs in here too)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _program._check_labels(labels, "input 0", env, _program._CALL_SITE)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
