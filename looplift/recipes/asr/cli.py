"""looplift-asr: speech recognition on speech synthesized by eSpeak NG (``pip install looplift[speech]``).

Commands:
  run         the main job: synthesize the data (cached), train a few minutes, report WER on held-out voices
              and draw a test utterance (DIR/utterance.png)
  train       train (or --resume) a recognizer into --dir
  eval        word and character error rates of the recognizer in --dir on dev or test
  transcribe  the transcript of WAV files (16-bit mono, 22,050 Hz)
  picture     a PNG of one utterance: its spectrogram, the alignment (CTC, transducer) or attention weights
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import looplift as ll

from .._cli import COUNT, NONNEGATIVE, POSITIVE, POSITIVE_FLOAT, Parser, UsageError, run_command

DEFAULT_DIR = "asr-run"




def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = Parser(prog="looplift-asr", description=__doc__.split("\n\n")[0],
                    epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, minutes, text in (("run", 5.0, "synthesize, train and evaluate (the main job)"),
                                ("train", 30.0, "train a recognizer")):
        p = sub.add_parser(name, formatter_class=fmt, help=text, description=text)
        p.add_argument("--dir", default=DEFAULT_DIR, help="the run's folder: checkpoints and the model")
        p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
        p.add_argument("--minutes", type=NONNEGATIVE, default=minutes,
                       help="training time budget in minutes (0: no limit, use --epochs)")
        p.add_argument("--epochs", type=POSITIVE, default=None, help="stop after this many epochs")
        p.add_argument("--batch", type=POSITIVE, default=32, help="utterances per batch (length-bucketed)")
        p.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3, help="Adam learning rate")
        p.add_argument("--decoder", choices=["ctc", "rnnt", "aed"], default="ctc",
                       help="CTC, a transducer (RNN-T) or an attention decoder, over the same encoder")
        p.add_argument("--voices", type=POSITIVE, default=5, help="voices speaking each training sentence")
        p.add_argument("--sentences", type=POSITIVE, default=None,
                       help="only the first N sentences of each part (a quick run)")
        p.add_argument("--eval-utterances", type=POSITIVE, default=100,
                       help="dev utterances decoded after each epoch")
        p.add_argument("--seed", type=int, default=0, help="random seed (data plan, initialization, batches)")
        p.add_argument("--resume", action="store_true", help="continue the run in --dir where it stopped")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("eval", formatter_class=fmt, help="word and character error rates")
    p.add_argument("--dir", default=DEFAULT_DIR, help="the run's folder")
    p.add_argument("--split", choices=["dev", "test"], default="test", help="which part")
    p.add_argument("--beam", type=POSITIVE, default=1, help="beam size (1: greedy; CTC: its prefix search)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="only the first N utterances")
    p.add_argument("--sentences", type=POSITIVE, default=None, help="only the first N sentences of the part")
    p.add_argument("--seed", type=int, default=0, help="the data plan's seed")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p = sub.add_parser("transcribe", formatter_class=fmt, help="transcribe WAV files")
    p.add_argument("wavs", nargs="+", metavar="WAV", help="16-bit mono WAV files at 22,050 Hz")
    p.add_argument("--dir", default=DEFAULT_DIR, help="the run's folder")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p = sub.add_parser("picture", formatter_class=fmt, help="a picture of one utterance (PNG)",
                       description="the log-mel spectrogram of one utterance with the recognized characters where "
                                   "the model emits them (CTC, transducer) or its attention weights")
    p.add_argument("--dir", default=DEFAULT_DIR, help="the run's folder")
    p.add_argument("--wav", default=None, help="a WAV file (16-bit mono, 22,050 Hz) instead of a test utterance")
    p.add_argument("--split", choices=["dev", "test"], default="test", help="the part of --utterance")
    p.add_argument("--utterance", type=COUNT, default=0, help="which utterance of --split (from 0)")
    p.add_argument("--sentences", type=POSITIVE, default=None, help="only the first N sentences of the part")
    p.add_argument("--beam", type=POSITIVE, default=1, help="beam size of the transducer's and attention search")
    p.add_argument("--out", default=None, help="the PNG to write (None: DIR/utterance.png)")
    p.add_argument("--seed", type=int, default=0, help="the data plan's seed")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    return parser


def _data(args, synth):
    from . import data
    utterances = data.plan(synth, seed=getattr(args, "seed", 0), train_voices=getattr(args, "voices", 5),
                           sentences=getattr(args, "sentences", None))
    return utterances


def train(args):
    from looplift.train import Trainer, bucketed_batches

    from . import data, recipe
    from .model import Config, build
    from .synth import Synthesizer
    if args.minutes == 0 and args.epochs is None:
        raise UsageError("--minutes 0 trains without a time limit: give --epochs")
    synth = Synthesizer()
    plan = _data(args, synth)
    progress = not args.no_progress
    audio = {part: data.load(part, plan[part], synth, progress=progress) for part in ("train", "dev")}
    train_audio = audio["train"]
    torch.manual_seed(args.seed)
    model = build(Config(decoder=args.decoder))
    usable = recipe.alignable(train_audio, model)
    lengths = train_audio.lengths()
    print(f"training on {len(usable)} utterances ({train_audio.hours():.2f} h, {len(train_audio) - len(usable)} "
          f"too fast to align left out); model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters", flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    dev = audio["dev"]
    dev_sample = list(range(0, len(dev), max(1, len(dev) // args.eval_utterances)))[:args.eval_utterances]

    def make_batches(epoch: int):
        batches = bucketed_batches([lengths[i] for i in usable], batch_size=args.batch, seed=args.seed, epoch=epoch)
        return [[usable[i] for i in b] for b in batches]

    def evaluate(m):
        s = recipe.evaluate(m, dev, dev_sample)
        return {"dev_wer": s["wer"], "dev_cer": s["cer"]}

    trainer = Trainer(model, recipe.loss_function(train_audio), optimizer, clip_norm=5.0, checkpoint_dir=args.dir,
                      metadata={"looplift-asr": "1", "config": model.config.to_json()},
                      progress="epochs" if args.no_progress else True, keep_best="dev_wer")
    history = trainer.fit(make_batches, epochs=args.epochs, time_budget=args.minutes * 60 or None,
                          evaluate=evaluate, resume=args.resume)
    if history:
        last = history[-1]
        print(f"trained {trainer.global_step} steps in {trainer.elapsed_seconds / 60:.1f} min; last epoch: train "
              f"loss {last['train_loss']:.3f}, dev WER {100 * last['eval']['dev_wer']:.1f}%, CER "
              f"{100 * last['eval']['dev_cer']:.1f}%", flush=True)
    return model


def load_model(directory: str):
    from safetensors import safe_open

    from looplift.errors import CheckpointError
    from looplift.train.checkpoint import load as load_params
    from looplift.train.trainer_state import BEST_FILE, MODEL_FILE

    from .model import Config, build
    for name in (BEST_FILE, MODEL_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            break
    else:
        raise CheckpointError(f"no recognizer in {directory!r}: train one first (looplift-asr train --dir ...)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("looplift-asr") != "1":
        raise CheckpointError(f"{path!r} is not a looplift-asr model")
    model = build(Config.from_json(meta["config"]))
    load_params(model, path)
    model.eval()
    return model


def evaluate(args) -> None:
    from . import data, recipe
    from .synth import Synthesizer
    model = load_model(args.dir)
    synth = Synthesizer()
    plan = _data(args, synth)
    audio = data.load(args.split, plan[args.split], synth, progress=False)
    indices = list(range(len(audio)))[:args.limit]
    start = time.perf_counter()
    beam = getattr(args, "beam", 1)
    s = recipe.evaluate(model, audio, indices, beam=beam)
    seconds = time.perf_counter() - start
    how = f"{model.config.decoder}, " + ("greedy" if beam == 1 else f"beam {beam}")
    print(f"{args.split}: {len(indices)} utterances (voices and sentences not trained on), {how}: WER "
          f"{100 * s['wer']:.2f}%, CER {100 * s['cer']:.2f}%; decoded in {seconds:.1f} s", flush=True)


def _wav_audio(paths):
    """The WAV files `paths` as an :class:`Audio` (without transcripts)."""
    from . import data
    from .synth import SAMPLE_RATE, read_wav
    waves = []
    for path in paths:
        samples, rate = read_wav(path)
        if rate != SAMPLE_RATE:
            raise UsageError(f"{path}: {rate} Hz; the recognizer takes {SAMPLE_RATE} Hz")
        waves.append(torch.from_numpy(samples.astype("int16")))
    offsets = torch.tensor([0] + [len(w) for w in waves]).cumsum(0)
    return data.Audio(torch.cat(waves), offsets, [data.Utterance("", "", 0, 0, None, 0)] * len(waves))


def transcribe(args) -> None:
    from . import recipe
    model = load_model(args.dir)
    for path, text in zip(args.wavs, recipe.decode(model, _wav_audio(args.wavs))):
        print(f"{path}\t{text}", flush=True)


def picture(args) -> None:
    from . import data
    from .picture import analyze, draw
    from .synth import Synthesizer
    model = load_model(args.dir)
    if args.wav is not None:
        audio, index = _wav_audio([args.wav]), 0
    else:
        synth = Synthesizer()
        audio = data.load(args.split, _data(args, synth)[args.split], synth, progress=False)
        if args.utterance >= len(audio):
            raise UsageError(f"--utterance {args.utterance}: {args.split} has {len(audio)} utterances (0.."
                             f"{len(audio) - 1})")
        index = args.utterance
    out = args.out or os.path.join(args.dir, "utterance.png")
    p = analyze(model, audio, index, beam=args.beam)
    draw(p, out)
    print(f"{out}: {args.wav or f'{args.split} utterance {index}'}, recognized {p.text!r}"
          + (f" (reference {p.reference!r})" if p.reference else ""), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    run_command("looplift-asr", lambda: _command(args))


def _command(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    ll.reuse_freed_memory()   # (a step's large tensors reuse the last step's memory: no page faults)
    if args.command in ("train", "run"):
        train(args)
        if args.command == "run":
            args.split, args.limit, args.beam = "test", None, 1
            evaluate(args)
            args.wav, args.utterance, args.out = None, 0, None
            picture(args)
    elif args.command == "eval":
        evaluate(args)
    elif args.command == "picture":
        picture(args)
    else:
        transcribe(args)


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
