"""``looplift.compile(..., backend=...)`` over a run of varying lengths: compile time, recompiles, step time.

The speech models of ``loop_training.py`` (a BiLSTM encoder over 16-dim features under an attention LSTM
decoder, ``speech_aed``, or a 2-layer step-wise Transformer decoder, ``speech_transformer``), trained with
Adam on batches whose padded lengths and entry lengths change every step, three ways in one process with
the same weights: the program compiled with the backend, the program eager, and the hand-written twin. A
compile counter wrapped around the backend counts the frames dynamo compiles: after the first batch no new
length or batch size should compile again. Losses are asserted close to the eager program's.

The last line is one JSON object: seconds of the first compiled step (compiling), frames compiled at the
first step and after all of them, and the medians of the per-step ratios compiled vs hand-written and eager
vs hand-written (the order alternating per step).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from loop_training import SpeechAED, SpeechTransformer, speech_aed_by_hand, speech_transformer_by_hand
from torch._dynamo.testing import CompileCounterWithBackend

import looplift as ll

B = ll.batch_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["speech_aed", "speech_transformer"], default="speech_transformer")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=20, help="batches after the first (each of new lengths)")
    parser.add_argument("--batch", type=int, nargs=2, default=[24, 40], help="batch sizes drawn from this range")
    parser.add_argument("--steps-per-call", type=int, default=8,
                        help="a loop's compiled steps per call (looplift.compile's steps_per_call)")
    args = parser.parse_args()
    torch.manual_seed(0)
    src_time, tgt_time = ll.Dim("src_time"), ll.Dim("tgt_time")
    feat, vocab = ll.Dim("feat", 16), ll.Dim("vocab", 40)
    cls, by_hand = {"speech_aed": (SpeechAED, speech_aed_by_hand),
                    "speech_transformer": (SpeechTransformer, speech_transformer_by_hand)}[args.model]
    model = cls(feat, vocab)
    counter = CompileCounterWithBackend(args.backend)
    compiled = ll.compile(model, mode="train", backend=counter, steps_per_call=args.steps_per_call)
    eager = ll.compile(model, mode="train")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    kw = dict(src_time=src_time, tgt_time=tgt_time)

    def batch(seed: int):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(args.batch[0], args.batch[1] + 1, (), generator=g))
        frames, steps = int(torch.randint(12, 30, (), generator=g)), int(torch.randint(40, 80, (), generator=g))
        feats = torch.randn(n, frames, feat.size, generator=g)
        src_len = torch.randint(frames // 2, frames + 1, (n,), generator=g)
        src_len[0] = frames
        tgt = torch.randint(1, vocab.size, (n, steps), generator=g)
        tgt_len = torch.randint(steps // 2, steps + 1, (n,), generator=g)
        tgt_len[0] = steps
        named = (ll.Named(feats, (B, src_time, feat), {src_time: src_len}),
                 ll.Named(tgt, (B, tgt_time), {tgt_time: tgt_len}, sparse_dim=vocab))
        return named, (feats, src_len, tgt, tgt_len)

    def train_step(fn) -> float:
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    named, raw = batch(0)
    first = train_step(lambda: compiled(*named, **kw).tensor)
    frames_first = counter.frame_count
    ratios = {"compiled": [], "eager": []}
    for seed in range(1, args.steps + 1):
        named, raw = batch(seed)
        a, b = compiled(*named, **kw).tensor, eager(*named, **kw).tensor   # (grad mode on: as in training)
        assert math.isclose(float(a), float(b), rel_tol=1e-4), (float(a), float(b))
        fns = {"compiled": lambda n=named: compiled(*n, **kw).tensor,
               "eager": lambda n=named: eager(*n, **kw).tensor,
               "hand": lambda r=raw: by_hand(model, *r)}
        order = list(fns) if seed % 2 else list(fns)[::-1]
        times = {k: train_step(fns[k]) for k in order}
        for k in ratios:
            ratios[k].append(times[k] / times["hand"])
    result = {"model": args.model, "backend": args.backend, "steps_per_call": args.steps_per_call,
              "first_step_s": round(first, 1),
              "frames_after_first_step": frames_first, "frames_after_all_steps": counter.frame_count,
              "compiled_vs_handwritten": round(statistics.median(ratios["compiled"]), 3),
              "eager_vs_handwritten": round(statistics.median(ratios["eager"]), 3)}
    print(f"{args.model}, backend {args.backend}: first step {first:.1f} s (compiling); frames compiled "
          f"{frames_first} after it, {counter.frame_count} after {args.steps} more batches of new sizes")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
