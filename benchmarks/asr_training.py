"""Speech recognition training speed: each decoder of the speech recipe, optimized vs its step-by-step loop.

Each recognizer (``looplift/recipes/asr/model.py``: CTC, the transducer, the attention decoder, over the same
encoder) is written once. ``looplift.compile(model)`` trains it with the loop optimizer (the transducer's
prediction network and the attention decoder's loop moved out of the step where they can be);
``looplift.compile(model, optimize=False)`` runs the same loops as written, step by step. Both take the same
batches of synthesized utterances (the recipe's dev part, length-bucketed, ``--batch`` utterances each),
forward plus backward, alternating per batch; the losses are asserted equal. A third way is the optimized
program with its BiLSTM encoder run over packed sequences (as before the padded sequence kernel, see
``looplift.ops.rnn.PADDED_MIN_STEPS``). Prints utterances/s of each and the paired ratios, and a last JSON
line.

Run: ``python benchmarks/asr_training.py [--batch 32 --batches 6]`` (needs ``pip install looplift[speech]``;
the first run synthesizes the dev part, about 1 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import looplift as ll
from looplift.recipes.asr import data, recipe
from looplift.recipes.asr.model import Config, build
from looplift.recipes.asr.synth import Synthesizer
from looplift.train import bucketed_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per decoder (after one untimed)")
    parser.add_argument("--decoders", default="ctc,rnnt,aed")
    args = parser.parse_args()
    synth = Synthesizer()
    audio = data.load("dev", data.plan(synth)["dev"], synth, progress=False)
    batches = bucketed_batches(audio.lengths(), batch_size=args.batch, seed=0, epoch=0)[:args.batches + 1]
    results = {}
    for decoder in args.decoders.split(","):
        torch.manual_seed(0)
        model = build(Config(decoder=decoder, dropout=0.0))
        optimized = ll.compile(model, mode="train")
        programs = {"optimized": optimized, "step_by_step": ll.compile(model, mode="train", optimize=False),
                    "packed": _packed(optimized)}
        seconds = {k: [] for k in programs}
        for i, batch in enumerate(batches):
            x = recipe.features(model, audio, batch)
            y = recipe.transcripts(model, [audio.utterances[j].text for j in batch])
            losses = {}
            for name in list(programs)[::1 if i % 2 == 0 else -1]:
                start = time.perf_counter()
                loss = programs[name](x, y).tensor
                loss.backward()
                elapsed = time.perf_counter() - start
                model.zero_grad(set_to_none=True)
                losses[name] = loss.detach()
                if i:                                   # (the first batch traces and prepares: untimed)
                    seconds[name].append(elapsed)
            torch.testing.assert_close(losses["optimized"], losses["step_by_step"], rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(losses["optimized"], losses["packed"], rtol=1e-4, atol=1e-3)
        rate = {k: args.batch / statistics.median(v) for k, v in seconds.items()}
        ratio = statistics.median(s / o for o, s in zip(seconds["optimized"], seconds["step_by_step"]))
        packed = statistics.median(p / o for o, p in zip(seconds["optimized"], seconds["packed"]))
        results[decoder] = {"optimized_utt_per_s": round(rate["optimized"], 1),
                            "step_by_step_utt_per_s": round(rate["step_by_step"], 1),
                            "optimized_vs_step_by_step": round(ratio, 2),
                            "packed_utt_per_s": round(rate["packed"], 1), "padded_vs_packed": round(packed, 2)}
        print(f"{decoder}: optimized {rate['optimized']:.1f} utterances/s, step by step "
              f"{rate['step_by_step']:.1f} utterances/s: {ratio:.2f}x (median paired ratio, {args.batches} batches "
              f"of {args.batch}); the encoder over packed sequences: {rate['packed']:.1f} utterances/s (the "
              f"padded kernel {packed:.2f}x)", flush=True)
    print(json.dumps(results))


def _packed(program):
    """`program` with the sequence kernel over packed sequences (``PADDED_MIN_STEPS`` out of reach): the speed
    of the recurrent encoder before the padded kernel."""
    from looplift.ops import rnn

    def run(*args):
        saved, rnn.PADDED_MIN_STEPS = rnn.PADDED_MIN_STEPS, 10**9
        try:
            return program(*args)
        finally:
            rnn.PADDED_MIN_STEPS = saved

    return run


if __name__ == "__main__":
    main()
