"""G2P training speed: the looplift recipe's model vs the same model written by hand in plain PyTorch.

Both train the recipe's architecture (character embedding 64, 2-layer BiLSTM 256, LSTM decoder 256 with
dot attention whose context is fed back, readout over the phonemes; no dropout, plain cross-entropy) on the
same length-bucketed CMUdict batches (256 words) with Adam, in one process on CPU, paired: both take each
batch in turn, each going first on every other batch. The
hand-written one: ``torch.nn.LSTM`` encoder, an ``LSTMCell`` decoder stepped in a Python loop, the
readout and loss over the whole sequence after the loop (as a careful PyTorch user writes it).

It also reports the share of looplift's training step spent in the loop (forward and backward of the
recurrent core that stays in the loop) vs the moved-out parts, measured by timing the loop node's kernel
and the backward between the gradients reaching the loop's outputs and leaving its inputs.

And the share of looplift's step spent checking the label inputs (characters and phonemes, with their
vocabulary as ``sparse_dim``) against their vocabulary at each call (one min and max per input).

The last line is one JSON object: ``{"looplift_vs_handwritten": the median over batches of hand-written /
looplift step time (>= 1: looplift faster),
"looplift_words_per_s": ..., "handwritten_words_per_s": ..., "loop_share": ..., "label_check_share": ...}``.
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

from looplift.recipes.g2p import data, recipe
from looplift.recipes.g2p.model import EOS, G2P, Config
from looplift.runtime.loop_run import LoopRun
from looplift.train import bucketed_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _label_check import LabelCheckTimer  # noqa: E402  (the benchmarks' shared helper)


class HandG2P(torch.nn.Module):
    """The same architecture in plain PyTorch."""

    def __init__(self, c: Config):
        super().__init__()
        self.char_emb = torch.nn.Embedding(c.n_chars, c.emb)
        self.encoder = torch.nn.LSTM(c.emb, c.enc // 2, num_layers=c.enc_layers, bidirectional=True,
                                     batch_first=True)
        self.emb = torch.nn.Embedding(c.n_phonemes, c.emb)
        self.cell = torch.nn.LSTMCell(c.emb + c.enc, c.dec)
        self.query = torch.nn.Linear(c.dec, c.enc)
        self.readout = torch.nn.Linear(c.dec + c.enc, c.n_phonemes)

    def forward(self, x, x_len, y, y_len):
        packed = torch.nn.utils.rnn.pack_padded_sequence(self.char_emb(x), x_len, batch_first=True,
                                                         enforce_sorted=False)
        enc, _ = self.encoder(packed)
        enc, _ = torch.nn.utils.rnn.pad_packed_sequence(enc, batch_first=True, total_length=x.shape[1])
        src_mask = torch.arange(x.shape[1])[None, :] < x_len[:, None]
        b, t_out = y.shape
        prev = torch.cat([torch.full((b, 1), EOS, dtype=y.dtype), y[:, :-1]], 1)
        emb = self.emb(prev)
        h = enc.new_zeros(b, self.cell.hidden_size)
        c = enc.new_zeros(b, self.cell.hidden_size)
        ctx = enc.new_zeros(b, enc.shape[-1])
        hs, ctxs = [], []
        for t in range(t_out):
            h, c = self.cell(torch.cat([emb[:, t], ctx], -1), (h, c))
            energy = torch.einsum("bse,be->bs", enc, self.query(h)).masked_fill(~src_mask, float("-inf"))
            ctx = torch.einsum("bs,bse->be", torch.softmax(energy, -1), enc)
            hs.append(h)
            ctxs.append(ctx)
        logits = self.readout(torch.cat([torch.stack(hs, 1), torch.stack(ctxs, 1)], -1))
        mask = torch.arange(t_out)[None, :] < y_len[:, None]
        nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        return (nll * mask).sum(), int(mask.sum())


def hand_params_from(model: G2P) -> dict[str, torch.Tensor]:
    """The looplift model's parameters under :class:`HandG2P`'s names (the same but for the decoder
    cell: an LSTMCell's names have no layer)."""
    return {name.replace("_l0", "") if name.startswith("cell.") else name: p
            for name, p in model.named_parameters()}


class LoopTimer:
    """Times the loop node's kernel (forward) and the backward of its outputs (gradients in at its outputs,
    out at its inputs)."""

    def __init__(self):
        self.forward = 0.0
        self.backward = 0.0
        self._grad_in = None
        original = LoopRun.__call__
        timer = self

        def timed(run, env, *raws):
            start = time.perf_counter()
            out = original(run, env, *raws)
            timer.forward += time.perf_counter() - start
            outs = out if isinstance(out, tuple) else (out,)
            ins = [r for r in raws if isinstance(r, torch.Tensor) and r.requires_grad]
            for o in outs:
                if isinstance(o, torch.Tensor) and o.requires_grad:
                    o.register_hook(timer._in)
            for r in ins:
                r.register_hook(timer._out)
            return out

        LoopRun.__call__ = timed

    def _in(self, grad):
        if self._grad_in is None:
            self._grad_in = time.perf_counter()
        return grad

    def _out(self, grad):
        if self._grad_in is not None:
            self._last_out = time.perf_counter()
        return grad

    def step_done(self):
        if self._grad_in is not None and getattr(self, "_last_out", None) is not None:
            self.backward += self._last_out - self._grad_in
        self._grad_in = self._last_out = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="steps per progress line (and per loop-share round)")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps: rounds x steps, per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    splits = data.split(data.load())
    vocabs = recipe.build_vocabs(splits["train"], stress=False)
    config = Config(n_chars=len(vocabs.chars), n_phonemes=len(vocabs.phonemes))
    examples = recipe.Examples(splits["train"], vocabs)
    batches = bucketed_batches(examples.lengths(), batch_size=args.batch, seed=0, epoch=0)
    n_needed = args.warmup + args.rounds * args.steps
    batches = batches[:n_needed]

    model = G2P(config)
    hand = HandG2P(config)
    loss_fn = recipe.loss_function(examples)

    def hand_loss(batch):
        x, xl = data.encode_batch([examples.chars[i] for i in batch])
        y, yl = data.encode_batch([examples.prons[i] + [EOS] for i in batch])
        return hand(x, xl, y, yl)

    models = {"looplift": (model, lambda b: loss_fn(model, b)), "handwritten": (hand, hand_loss)}
    opts = {k: torch.optim.Adam(m.parameters(), lr=2e-3) for k, (m, _) in models.items()}
    timer = None

    def train_steps(name, bs):
        m, fn = models[name]
        words = 0
        start = time.perf_counter()
        for b in bs:
            loss, count = fn(b)
            opts[name].zero_grad()
            (loss / count).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0)
            opts[name].step()
            words += len(b)
            if name == "looplift" and timer is not None:
                timer.step_done()
        return words, time.perf_counter() - start

    for name in models:
        train_steps(name, batches[:args.warmup])
    # Paired: both models take each batch in turn, each going first on every other batch; the ratio is the
    # median over batches of the paired step-time ratios (a drift of the machine's speed cancels out).
    seconds = {k: [] for k in models}
    timed = batches[args.warmup:]
    checks = LabelCheckTimer()
    for i, b in enumerate(timed):
        for name in list(models)[::1 if i % 2 == 0 else -1]:
            if name == "looplift":
                with checks:   # (the label inputs' check against their vocabulary, within looplift's step)
                    seconds[name].append(train_steps(name, [b])[1])
            else:
                seconds[name].append(train_steps(name, [b])[1])
        if (i + 1) % args.steps == 0:
            print(f"{i + 1} steps: looplift {sum(map(len, timed[:i + 1])) / sum(seconds['looplift']):.0f} "
                  f"words/s, hand-written {sum(map(len, timed[:i + 1])) / sum(seconds['handwritten']):.0f}",
                  flush=True)
    words = sum(map(len, timed))
    rate = {k: words / sum(v) for k, v in seconds.items()}
    ratio = statistics.median(h / ll_ for h, ll_ in zip(seconds["handwritten"], seconds["looplift"]))
    check_share = checks.seconds / sum(seconds["looplift"])
    # the loop's share, timed in rounds of their own (the timer's hooks stay out of the rates above)
    timer = LoopTimer()
    loop_seconds = ll_seconds = 0.0
    for r in range(args.rounds):
        bs = batches[args.warmup + r * args.steps: args.warmup + (r + 1) * args.steps]
        before = timer.forward + timer.backward
        _, seconds = train_steps("looplift", bs)
        loop_seconds += timer.forward + timer.backward - before
        ll_seconds += seconds
    share = loop_seconds / ll_seconds
    print(f"words/s: looplift {rate['looplift']:.0f}, hand-written {rate['handwritten']:.0f}; median paired "
          f"step-time ratio (hand-written / looplift) {ratio:.3f}; "
          f"looplift's step: {100 * share:.0f}% in the loop (forward {timer.forward:.1f} s, backward "
          f"{timer.backward:.1f} s of {ll_seconds:.1f} s)")
    print(f"label inputs checked against their vocabulary: {checks.calls} checks, "
          f"{1e3 * checks.seconds / checks.calls:.3f} ms each, {100 * check_share:.2f}% of looplift's step time")
    print(json.dumps({"looplift_vs_handwritten": round(ratio, 3),
                      "looplift_words_per_s": round(rate["looplift"], 1),
                      "handwritten_words_per_s": round(rate["handwritten"], 1),
                      "loop_share": round(share, 3), "label_check_share": round(check_share, 5)}))


if __name__ == "__main__":
    main()
