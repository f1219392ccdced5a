"""looplift-g2p: grapheme-to-phoneme conversion on the CMU Pronouncing Dictionary.

Commands:
  run      the main job: train for a time budget, evaluate on test with beam search, convert a few words
  train    train (or --resume) a model into --dir
  eval     phoneme and word error rates of the model in --dir on dev or test
  convert  the n-best pronunciations of words
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch

import looplift as ll

from .._cli import COUNT, NONNEGATIVE, POSITIVE, POSITIVE_FLOAT, Parser, UsageError, number, run_command
from . import data, recipe
from .model import G2P, Config
from .transducer import TransducerConfig
from .transformer import TransformerConfig

DEFAULT_DIR = "g2p-run"
MEMBERS_FILE = "members.json"   # a run of several members (--members): their folders, in the run's folder
EXAMPLE_WORDS = ["looplift", "transducer", "phoneme", "beam", "pytorch"]


_FRACTION = number(float, "in [0, 1)", 0, 1, open_high=True)
_DECAY = number(float, "in (0, 1]", 0, 1, open_low=True)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=DEFAULT_DIR, help="the run's folder: checkpoints and the model")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice)")


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=["best", "last", "average"], default="best",
                   help="the run's model with the best dev WER (best.safetensors; the last one if the run kept "
                        "none), the last one (model.safetensors), or the mean of the last epochs' models "
                        "(average.safetensors: trained with --average)")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="DIR",
                   help="decode with the models of these runs too (the same vocabularies; attention LSTM and "
                        "Transformer models together, or transducers together): the mean of their "
                        "log-probabilities picks each phoneme (a transducer's: each symbol)")


def member_dirs(directory: str) -> list[str]:
    """The folders of the models of a run: its members' (``--members``), or the run's own folder."""
    path = os.path.join(directory, MEMBERS_FILE)
    if not os.path.isfile(path):
        return [directory]
    try:
        with open(path) as f:
            names = json.load(f)["members"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a list of the run's members ({type(e).__name__}: {e})") from None
    return [os.path.join(directory, name) for name in names]


def _load(args):
    """The model of ``--dir`` (with those of its members and of ``--ensemble``, an :class:`Ensemble`) and its
    vocabularies."""
    which = getattr(args, "checkpoint", "best")
    first, *extra = [d for directory in [args.dir, *getattr(args, "ensemble", [])] for d in member_dirs(directory)]
    model, vocabs = recipe.load_model(first, which=which)
    if not extra:
        return model, vocabs
    from .ensemble import Ensemble, TransducerEnsemble
    members = [model]
    for directory in extra:
        m, v = recipe.load_model(directory, which=which)
        if (v.chars.symbols, v.phonemes.symbols) != (vocabs.chars.symbols, vocabs.phonemes.symbols):
            raise UsageError(f"--ensemble {directory}: its characters or phonemes differ from those of {first}")
        members.append(m)
    transducers = [m.config.arch == "transducer" for m in members]
    if all(transducers):
        return TransducerEnsemble(members), vocabs
    for directory, m, transducer in zip([first, *extra], members, transducers):
        if transducer:
            raise UsageError(f"{directory}: a transducer can be part of an ensemble of transducers only (it "
                             f"searches alignments; the others search phonemes)")
        if not hasattr(m, "decoder_step"):
            raise UsageError(f"{directory}: a {m.config.arch} model cannot be part of an ensemble (only attention "
                             f"LSTM and Transformer models)")
    return Ensemble(members), vocabs


def _add_train_options(p: argparse.ArgumentParser, *, minutes: float) -> None:
    p.add_argument("--minutes", type=NONNEGATIVE, default=minutes,
                   help="training time budget in minutes (0: no limit, use --epochs or --max-steps)")
    p.add_argument("--epochs", type=POSITIVE, default=None, help="stop after this many epochs")
    p.add_argument("--max-steps", type=POSITIVE, default=None,
                   help="stop after this many steps (in all, with --resume)")
    p.add_argument("--batch", type=POSITIVE, default=128, help="words per batch (length-bucketed)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-3, help="Adam learning rate (the cosine schedule's peak)")
    p.add_argument("--lr-schedule", choices=["cosine", "epochs"], default="cosine",
                   help="cosine: the learning rate rises over the first --warmup of the budget (--minutes, "
                        "--epochs or --max-steps, whichever ends first) and falls to 0 at its end on a half "
                        "cosine; epochs: it decays by --lr-decay per epoch")
    p.add_argument("--warmup", type=_FRACTION, default=0.02,
                   help="the cosine schedule's warm-up, a fraction of the budget")
    p.add_argument("--lr-decay", type=_DECAY, default=0.9,
                   help="with --lr-schedule epochs: multiply the learning rate by this after each epoch (1: constant)")
    p.add_argument("--average", type=COUNT, default=0, metavar="K",
                   help="also keep the model's parameters averaged over the ends of the last K epochs "
                        "(average.safetensors; eval and convert read it with --checkpoint average); 0: off")
    p.add_argument("--clip", type=NONNEGATIVE, default=5.0, help="gradient clipping by total norm (0: off)")
    p.add_argument("--dropout", type=_FRACTION, default=0.1, help="dropout of embeddings, encoder layers, readout")
    p.add_argument("--label-smoothing", type=_FRACTION, default=0.1, help="label smoothing of the cross-entropy")
    p.add_argument("--arch", choices=["lstm", "transformer", "transducer"], default="lstm",
                   help="the model: BiLSTM encoder + attention LSTM decoder, a Transformer, or a transducer "
                        "(RNN-T: the BiLSTM encoder, an LSTM prediction network of size --dec, a joint of size "
                        "--joint; full-sum training). The --emb ... --dec sizes are the LSTM's and the "
                        "transducer's, --model-dim ... --layers the Transformer's")
    p.add_argument("--joint", type=POSITIVE, default=256, help="the transducer's joint network size")
    p.add_argument("--pred-context", type=COUNT, default=0,
                   help="the transducer's prediction network: 0, an LSTM (--dec wide) over all phonemes so far; "
                        "k, the last k phonemes alone (stateless: a sum of their embeddings, --dec wide, and a ReLU)")
    p.add_argument("--max-labels", type=POSITIVE, default=3,
                   help="the transducer's phonemes per character at most, in search")
    p.add_argument("--emb", type=POSITIVE, default=64, help="character and phoneme embedding size")
    p.add_argument("--enc", type=POSITIVE, default=256, help="encoder size per layer (both directions)")
    p.add_argument("--enc-layers", type=POSITIVE, default=2, help="bidirectional LSTM encoder layers")
    p.add_argument("--dec", type=POSITIVE, default=256, help="decoder LSTM size")
    p.add_argument("--model-dim", type=POSITIVE, default=128, help="Transformer width")
    p.add_argument("--heads", type=POSITIVE, default=4, help="Transformer attention heads")
    p.add_argument("--ff", type=POSITIVE, default=512, help="Transformer feed-forward size")
    p.add_argument("--layers", type=POSITIVE, default=2, help="Transformer encoder layers, and as many decoder layers")
    p.add_argument("--stress", action="store_true", help="keep stress markers (default: stripped, 39 phonemes)")
    p.add_argument("--words", type=POSITIVE, default=None,
                   help="train on only the first N training words (by the split's order), for quick runs")
    p.add_argument("--eval-words", type=COUNT, default=2000,
                   help="dev words decoded after each epoch, a sample in hash order (not alphabetical) of the dev "
                        "split; the model with the best dev WER is kept as best.safetensors, which eval and "
                        "convert use (0: no evaluation, no best.safetensors)")
    p.add_argument("--eval-beam", type=POSITIVE, default=5, help="beam size of the per-epoch dev evaluation")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialization, batches, dropout)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --dir exactly where it stopped (same options)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a line per epoch only)")
    p.add_argument("--members", type=POSITIVE, default=1,
                   help="train this many models side by side, each in a process of its own (--threads each; "
                        "default: the CPUs shared out), with seeds --seed, --seed + 1, ..., into --dir/member-1, "
                        "...; eval, convert and run decode with all of them as an ensemble")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="looplift-g2p", description=__doc__.split("\n\n")[0],
                    epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", formatter_class=fmt, help="train, evaluate and convert (the main job)",
                       description="Train a model for a time budget, evaluate it on the test split with beam "
                                   "search, print PER/WER and a few converted words.")
    _add_common(p)
    _add_train_options(p, minutes=3.0)
    p.add_argument("--beam", type=POSITIVE, default=5, help="beam size of the final evaluation")
    p.add_argument("--split", choices=["dev", "test"], default="test", help="the split evaluated at the end")
    p.add_argument("--limit", type=POSITIVE, default=None, help="evaluate only the first N words of the split")

    p = sub.add_parser("train", formatter_class=fmt, help="train a model",
                       description="Train a G2P model on the train split; a checkpoint is written to --dir "
                                   "after each epoch and when training stops (resume with --resume).")
    _add_common(p)
    _add_train_options(p, minutes=10.0)

    p = sub.add_parser("eval", formatter_class=fmt, help="phoneme and word error rates",
                       description="Decode a split with beam search and print the phoneme error rate (against "
                                   "the closest pronunciation) and the word error rate (no pronunciation matched).")
    _add_common(p)
    _add_checkpoint(p)
    p.add_argument("--split", choices=["dev", "test"], default="dev", help="which split")
    p.add_argument("--beam", type=POSITIVE, default=5, help="beam size")
    _add_threshold(p)
    p.add_argument("--limit", type=POSITIVE, default=None, help="only the first N words of the split")
    p.add_argument("--batch", type=POSITIVE, default=None,
                   help=f"words decoded at once (default: {recipe.TRANSDUCER_DECODE_BATCH} for transducers, "
                        f"{recipe.DECODE_BATCH} for the others)")
    p.add_argument("--workers", type=POSITIVE, default=None,
                   help="batches searched side by side on CPU, each with one torch thread (default: torch's "
                        "threads, at most 4)")

    p = sub.add_parser("convert", formatter_class=fmt, help="pronounce words",
                       description="Print the n-best pronunciations of WORDs with their log-probabilities.")
    _add_common(p)
    _add_checkpoint(p)
    p.add_argument("words", nargs="+", metavar="WORD", help="words to convert (case is ignored)")
    p.add_argument("--beam", type=POSITIVE, default=5, help="beam size")
    _add_threshold(p)
    p.add_argument("--nbest", type=POSITIVE, default=3, help="pronunciations printed per word")
    return parser


def _add_threshold(p) -> None:
    p.add_argument("--threshold", type=NONNEGATIVE, default=None,
                   help="keep only hypotheses within this log-probability of the best (at most --beam): the beam "
                        "shrinks where the model is sure (default: off)")


def _threshold(args) -> float | None:
    return getattr(args, "threshold", None)   # (`run` has none)


def _check(args) -> None:
    """Arguments that do not go together, before any work."""
    if args.command in ("train", "run"):
        if args.minutes == 0 and args.epochs is None and args.max_steps is None:
            raise UsageError("--minutes 0 trains without a time limit: give --epochs or --max-steps")
        if args.arch == "transformer" and args.model_dim % (2 * args.heads):
            raise UsageError(f"--model-dim ({args.model_dim}) must be a multiple of 2 * --heads ({2 * args.heads})")
        if os.path.exists(args.dir) and not os.path.isdir(args.dir):
            raise UsageError(f"--dir {args.dir!r} is a file, not a folder")
        if args.members > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--members trains its own processes: run it without torchrun")
        members = os.path.join(args.dir, MEMBERS_FILE)
        if args.members == 1 and os.path.isfile(members):
            raise UsageError(f"--dir {args.dir!r} holds a run of several members ({MEMBERS_FILE}): train it with "
                             f"--members, or another --dir")
        if args.members > 1 and os.path.exists(args.dir) and not os.path.isfile(members) and \
                os.path.isfile(os.path.join(args.dir, "last.safetensors")):
            raise UsageError(f"--dir {args.dir!r} holds a run of one model: --members {args.members} needs "
                             f"another --dir")
        if args.resume:
            if args.members > 1 and not os.path.isfile(members):
                raise UsageError(f"--resume: there is no run of members to resume in {args.dir!r} (no "
                                 f"{MEMBERS_FILE})")
            dirs = member_dirs(args.dir) if os.path.isfile(members) else [args.dir]
            if args.members > 1 and len(dirs) != args.members:
                raise UsageError(f"--resume: the run in {args.dir!r} has {len(dirs)} members, not {args.members}")
            for d in dirs:
                if not os.path.isfile(os.path.join(d, "last.safetensors")):
                    raise UsageError(f"--resume: there is no run to resume in {d!r} (no last.safetensors)")
        try:
            os.makedirs(args.dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--dir {args.dir!r} cannot be made: {e.strerror or e}") from None
        if not os.access(args.dir, os.W_OK | os.X_OK):
            raise UsageError(f"--dir {args.dir!r} is not writable")
    if args.command == "convert" and not all(w.strip() for w in args.words):
        raise UsageError("a WORD to convert is empty")


def _schedule(args, progress, steps_per_epoch: int):
    """The learning rate's factor as a function of the step: over the budget (`progress()`, 0 to 1) for the
    cosine schedule, per epoch for the other (smoothly over an epoch's steps)."""
    if args.lr_schedule == "epochs":
        return lambda step: args.lr_decay ** (step / steps_per_epoch)

    def cosine(step: int) -> float:
        if step == 0:
            return 1e-3 if args.warmup else 1.0   # (the trainer is not built yet when the scheduler starts)
        done = progress()
        if done < args.warmup:
            return max(done / args.warmup, 1e-3)
        return 0.5 * (1 + math.cos(math.pi * (done - args.warmup) / (1 - args.warmup)))

    return cosine


def train(args) -> G2P:
    from looplift.train import Trainer, bucketed_batches
    splits = data.split(data.load(stress=args.stress))
    train_entries = splits["train"][:args.words] if args.words is not None else splits["train"]
    if not train_entries:
        raise UsageError("no training words")
    vocabs = recipe.build_vocabs(splits["train"], stress=args.stress)
    sizes = dict(n_chars=len(vocabs.chars), n_phonemes=len(vocabs.phonemes), dropout=args.dropout,
                 label_smoothing=args.label_smoothing)
    if args.arch == "transformer":
        config = TransformerConfig(**sizes, model=args.model_dim, heads=args.heads, ff=args.ff, layers=args.layers)
    elif args.arch == "transducer":
        del sizes["label_smoothing"]   # (the full-sum loss has none)
        config = TransducerConfig(**sizes, emb=args.emb, enc=args.enc, enc_layers=args.enc_layers, pred=args.dec,
                                  pred_context=args.pred_context, joint=args.joint, max_labels=args.max_labels)
    else:
        config = Config(**sizes, emb=args.emb, enc=args.enc, enc_layers=args.enc_layers, dec=args.dec)
    torch.manual_seed(args.seed)
    model = recipe.build_model(config)
    examples = recipe.Examples(train_entries, vocabs)
    lengths = examples.lengths()
    n_params = sum(p.numel() for p in model.parameters())
    if os.environ.get("RANK", "0") == "0":   # (under torchrun: once)
        print(f"training on {len(train_entries)} words ({len(examples)} pronunciations), {len(vocabs.chars) - 1} "
              f"characters, {len(vocabs.phonemes) - 1} phonemes; model: {n_params / 1e6:.2f} M parameters",
              flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = len(bucketed_batches(lengths, batch_size=args.batch, seed=args.seed, epoch=0))
    factor = _schedule(args, lambda: trainer.budget_done, steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    dev = data.sample(splits["dev"], args.eval_words) if args.eval_words else []

    def make_batches(epoch: int):
        return bucketed_batches(lengths, batch_size=args.batch, seed=args.seed, epoch=epoch,
                                world_size=trainer.world_size, rank=trainer.rank)

    def evaluate(m: G2P) -> dict[str, float]:
        if not dev:
            return {}
        s = recipe.evaluate(m, dev, vocabs, beam=args.eval_beam)
        return {"dev_per": s.per, "dev_wer": s.wer}

    trainer = Trainer(model, recipe.loss_function(examples), optimizer, scheduler=scheduler,
                      clip_norm=args.clip or None, checkpoint_dir=args.dir, metadata=vocabs.metadata(config),
                      progress="epochs" if args.no_progress else True, keep_best="dev_wer" if dev else None,
                      average_last=args.average or None)
    history = trainer.fit(make_batches, epochs=args.epochs, max_steps=args.max_steps,
                          time_budget=args.minutes * 60 if args.minutes else None, evaluate=evaluate,
                          resume=args.resume)
    if trainer.rank == 0 and history:
        # (words: pronunciations; an epoch stopped within counts its share of the epoch's steps)
        words = sum(len(examples) * min(1.0, h["epoch_steps"] / steps_per_epoch) for h in history)
        seconds = sum(h["seconds"] for h in history)
        last = history[-1]
        shown = "".join(f", {k} {v:.4f}" for k, v in last["eval"].items())
        print(f"trained {trainer.global_step} steps ({trainer.epoch} complete epochs) in {seconds / 60:.1f} min of "
              f"steps ({trainer.elapsed_seconds / 60:.1f} min with evaluations): {words / seconds:.0f} words/s; "
              f"last epoch: train loss {last['train_loss']:.4f}{shown}", flush=True)
    return model


class MemberFailed(Exception):
    """A member of a ``--members`` run stopped with an error (its own message is above)."""


def train_members(args) -> None:
    """``--members N``: N runs side by side, each in a process of its own with ``--threads`` torch threads
    (default: the CPUs shared out), seeds ``--seed + i``, into ``--dir/member-<i + 1>``, listed in
    ``--dir/members.json``. Their epoch lines are prefixed with the member's name (no progress bars)."""
    import multiprocessing
    names = [f"member-{i + 1}" for i in range(args.members)]
    path = os.path.join(args.dir, MEMBERS_FILE)
    if not args.resume:
        with open(path + ".tmp", "w") as f:
            json.dump({"members": names}, f)
        os.replace(path + ".tmp", path)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or max(1, cpus // args.members)
    context = multiprocessing.get_context("spawn")   # (no forked copy of torch's thread pools)
    processes = []
    for i, name in enumerate(names):
        member = argparse.Namespace(**{**vars(args), "command": "train", "members": 1, "threads": threads,
                                       "dir": os.path.join(args.dir, name), "seed": args.seed + i,
                                       "no_progress": True})
        os.makedirs(member.dir, exist_ok=True)
        processes.append(context.Process(target=_train_member, args=(member, name), name=name))
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:   # (each member saves its checkpoint on Ctrl-C too: wait for them)
        for p in processes:
            p.join()
        raise
    failed = [f"{p.name} (exit status {p.exitcode})" for p in processes if p.exitcode]
    if failed:
        raise MemberFailed(f"training stopped: {', '.join(failed)} failed")


def _train_member(args, name: str) -> None:
    """One member of :func:`train_members`, in its own process: its lines on stdout and stderr prefixed."""
    sys.stdout, sys.stderr = _Prefixed(sys.stdout, f"{name}: "), _Prefixed(sys.stderr, f"{name}: ")
    run_command("looplift-g2p", lambda: _command(args), expected=(data.UnknownSymbolError,))


class _Prefixed:
    """A text stream whose every line starts with `prefix`."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append((self.prefix if self.at_start else "") + piece)
            self.at_start = piece.endswith(("\n", "\r"))
        self.stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _settled() -> None:
    """What the command has loaded (the dictionary, the model, the data) lives as long as the command: the
    cyclic garbage collector leaves it out of its collections from now on (``gc.freeze``), each of which would
    walk all of it again (a tenth of an evaluation's time). Not for training: with the frozen objects out of its
    count of long-lived ones, the collector runs full collections more often (training then measured 3-19% slower
    in four paired one-minute runs)."""
    gc.freeze()


def evaluate(args) -> None:
    model, vocabs = _load(args)
    entries = data.split(data.load(stress=vocabs.stress))[args.split]
    _settled()
    if args.limit is not None:
        entries = entries[:args.limit]
    start = time.perf_counter()
    threshold = _threshold(args)
    batch = args.batch if args.command == "eval" else None   # (`run`'s --batch is its training batch)
    s = recipe.evaluate(model, entries, vocabs, beam=args.beam, batch_size=batch,
                        threshold=threshold, workers=getattr(args, "workers", None))
    seconds = time.perf_counter() - start
    beam = f"beam {args.beam}" + (f", threshold {threshold:g}" if threshold is not None else "")
    print(f"{args.split}: {s.words} words, {beam}: PER {100 * s.per:.2f}% "
          f"({s.phoneme_errors}/{s.phonemes} phonemes), WER {100 * s.wer:.2f}% ({s.word_errors} words wrong); "
          f"decoded in {seconds:.1f} s ({s.words / seconds:.0f} words/s)", flush=True)


def convert(args) -> None:
    model, vocabs = _load(args)
    _settled()
    words = [w.lower() for w in args.words]
    encoded = [vocabs.chars.encode(w) for w in words]   # (an unknown character: an error naming it)
    for word, hyps in zip(words, recipe.decode(model, encoded, beam=args.beam, threshold=_threshold(args))):
        for rank, (ids, score) in enumerate(hyps[:args.nbest]):
            label = word if rank == 0 else " " * len(word)
            print(f"{label}  {score:8.3f}  p={math.exp(score):.3f}  {' '.join(vocabs.phonemes.decode(ids))}")


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    run_command("looplift-g2p", lambda: _command(args), expected=(data.UnknownSymbolError, MemberFailed))


def _command(args) -> None:
    _check(args)   # (before any work)
    if args.threads:
        torch.set_num_threads(args.threads)
    ll.reuse_freed_memory()   # (a step's large tensors reuse the last step's memory: no page faults)
    try:
        if args.command == "train":
            train_members(args) if args.members > 1 else train(args)
        elif args.command == "run":
            train_members(args) if args.members > 1 else train(args)
            evaluate(args)
            args.words, args.nbest = EXAMPLE_WORDS, 2
            convert(args)
        elif args.command == "eval":
            evaluate(args)
        else:
            convert(args)
    finally:
        gc.unfreeze()   # (see _settled: called in-process, the caller's objects are collected as before)


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
