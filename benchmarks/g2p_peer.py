"""G2P on our CMUdict split: looplift's G2P recipe vs Phonetisaurus, scored the same way, on the same machine.

Phonetisaurus (PyPI ``phonetisaurus``, a WFST joint-sequence n-gram G2P: many-to-many alignment of letters
and phonemes by EM, a joint n-gram model over the aligned pairs with mitlm, converted to an OpenFst model,
decoded by ``phonetisaurus-g2pfst``; the wheel bundles all these binaries) lives in a virtual environment of
its own that the script builds on first use (``benchmarks/_peer_venv.py``, without torch;
``$LOOPLIFT_PHONETISAURUS_VENV`` or ``~/.cache/looplift-bench/phonetisaurus-venv``). On our split
(``data.split(data.load(stress=False))``) it is

* trained by its packaged recipe, ``phonetisaurus-train --seq2_del --ngram_order N`` (what the package's own
  ``phonetisaurus train`` runs, there always with order 8), on a lexicon line per pronunciation of every
  training word. The recipe's three steps are run one by one from its own script (the ``G2PModelTrainer``
  class of the packaged ``phonetisaurus-train``): the alignment (``phonetisaurus-align``) once, as it does not
  depend on the order, then per order of ``--orders`` the joint n-gram (``estimate-ngram -o N``) and its
  conversion to a WFST (``phonetisaurus-arpa2wfst``). An order's training time is the alignment's plus its
  own two steps: the time ``phonetisaurus-train --ngram_order N`` takes;
* tuned on dev: each order decodes the dev words, and the lowest dev WER (then PER, then the smaller order)
  is chosen;
* evaluated once on test with the chosen model: the 1-best of every test word, all words in one call of the
  package's decoder (``phonetisaurus.predict``, i.e. ``phonetisaurus-apply`` -> ``phonetisaurus-g2pfst``,
  its default beam). Decoding words/s is over that whole call, starting the decoder and loading the model
  included; that fixed cost (a one-word call) is reported apart as ``decode_startup_s``.

looplift's side is ``looplift-g2p eval`` of a trained model (``--looplift-dir``, default ``g2p-run``; the
script trains none): ``recipe.load_model`` then one timed ``recipe.evaluate(..., beam=5)`` over the test words,
as ``looplift-g2p eval`` times it (compiling the search and scoring included), in ``--threads`` torch threads.
Phonetisaurus's tools are single-threaded (they have no option for more).

Both are scored by ``looplift.recipes.g2p.metrics.score`` against every pronunciation of a word. The output
is a few lines and, last, one JSON object: per tool the test WER/PER, training seconds and decoding words/s,
Phonetisaurus's dev WER/PER per order tried and the order chosen, and the versions. A peer that cannot be
built or run is reported in that JSON (``reason``) and the benchmark goes on.

Run: ``python benchmarks/g2p_peer.py [--orders 6,7,8,9,10] [--looplift-dir g2p-run] [--no-peer] [--threads N]``
(a few minutes on 2 cores: Phonetisaurus's alignment alone takes about 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

import looplift
from looplift.errors import LoopliftError
from looplift.recipes.g2p import data, metrics, recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer_venv import PeerUnavailable, ensure_venv  # noqa: E402  (the benchmarks' shared helper)

PHONETISAURUS = "phonetisaurus==0.3.0"
RESERVED = set("}|_")      # phonetisaurus-train rejects a lexicon with these (its alignment's separators)

# Run by the venv's python: `train CONFIG OUT` aligns, trains every order and decodes dev with each;
# `decode CONFIG OUT` decodes the test words with the chosen model. CONFIG and OUT are JSON files.
PEER_SIDE = r"""
import importlib.metadata, importlib.util, json, logging, os, platform, sys, time
from importlib.machinery import SourceFileLoader
from pathlib import Path
import phonetisaurus

mode, cfg, out_path = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]
env = phonetisaurus.guess_environment()   # PATH and LD_LIBRARY_PATH of the wheel's binaries and libraries
env["PATH"] += os.pathsep + os.path.dirname(sys.executable)   # (a python3 for its python scripts, if none else)
os.environ.update(env)                    # (the recipe's steps find their programs on $PATH)
out = {"version": importlib.metadata.version("phonetisaurus")}

def predict(model, words):
    start = time.perf_counter()
    pairs = list(phonetisaurus.predict(words, model, nbest=1, env=env))
    return pairs, time.perf_counter() - start

def since(start):
    return time.perf_counter() - start

if mode == "train":
    # the packaged recipe, step by step: the G2PModelTrainer class of its phonetisaurus-train script
    script = Path(phonetisaurus.__file__).parent / "bin" / platform.machine() / "phonetisaurus-train"
    loader = SourceFileLoader("phonetisaurus_train", str(script))
    recipe = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    recipe.sys = sys                      # (the script imports sys only as a program, but exits by it on errors)
    loader.exec_module(recipe)
    trainer = recipe.G2PModelTrainer(cfg["lexicon"], dir_prefix=cfg["dir"], seq2_del=True,
                                     ngram_order=cfg["orders"][0])
    trainer.logger.setLevel(logging.WARNING)
    trainer.checkPhonetisaurusConfig()
    print("[phonetisaurus]   aligning the lexicon (phonetisaurus-align) ...", end=" ", flush=True)
    start = time.perf_counter()
    trainer.AlignLexicon()
    out["align_s"] = since(start)
    print(f"{out['align_s']:.0f} s", flush=True)
    out["orders"] = {}
    for order in cfg["orders"]:
        trainer.ngram_order = order       # (the paths as checkPhonetisaurusConfig names them, a model per order)
        trainer.arpa_path = os.path.join(cfg["dir"], f"model.o{order}.arpa")
        trainer.model_path = os.path.join(cfg["dir"], f"model.o{order}.fst")
        start = time.perf_counter()
        trainer.TrainNGramModel()
        ngram_s = since(start)
        start = time.perf_counter()
        trainer.ConvertARPAToWFST()
        convert_s = since(start)
        pairs, decode_s = predict(trainer.model_path, cfg["dev_words"])
        out["orders"][order] = {"model": trainer.model_path, "ngram_s": ngram_s, "convert_s": convert_s,
                                "dev_pairs": pairs, "dev_decode_s": decode_s}
        print(f"[phonetisaurus]   order {order}: n-gram {ngram_s:.0f} s, WFST {convert_s:.0f} s, "
              f"dev decoded in {decode_s:.1f} s", flush=True)
else:
    _, out["startup_s"] = predict(cfg["model"], cfg["words"][:1])   # starting the decoder, loading the model
    out["pairs"], out["decode_s"] = predict(cfg["model"], cfg["words"])
Path(out_path).write_text(json.dumps(out))
"""


def lexicon_lines(entries: Iterable[data.Entry]) -> list[str]:
    """Phonetisaurus's training lexicon: ``word<TAB>phonemes separated by spaces``, a line per pronunciation."""
    lines = []
    for entry in entries:
        if RESERVED & set(entry.word):
            raise ValueError(f"{entry.word!r} has a character Phonetisaurus reserves ({' '.join(sorted(RESERVED))})")
        lines.extend(f"{entry.word}\t{' '.join(pron)}" for pron in entry.prons)
    return lines


def hypotheses(pairs: Iterable[Sequence], words: Sequence[str]) -> tuple[list[list[str]], int]:
    """The 1-best phonemes of each of `words` from the decoder's (word, phonemes) pairs, and how many words it
    gave none for (``phonetisaurus-apply`` leaves those out; they count as an empty hypothesis, all wrong)."""
    found: dict[str, list[str]] = {}
    for word, phonemes in pairs:
        found.setdefault(word, list(phonemes))     # (the first, the best, if it gave more)
    return [found.get(word, []) for word in words], sum(word not in found for word in words)


def choose_order(dev: dict[int, metrics.Scores]) -> int:
    """The order with the lowest dev WER; of equal WERs, the lowest PER, then the smallest order."""
    return min(dev, key=lambda order: (dev[order].wer, dev[order].per, order))


def run_side(py: Path, mode: str, config: dict, tmp: Path) -> dict:
    """Run PEER_SIDE in the venv (its progress lines go to stdout); its JSON result."""
    cfg, out = tmp / f"{mode}-config.json", tmp / f"{mode}-out.json"
    cfg.write_text(json.dumps(config))
    done = subprocess.run([str(py), "-c", PEER_SIDE, mode, str(cfg), str(out)], stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not out.exists():
        tail = " | ".join(done.stderr.strip().splitlines()[-4:])
        raise PeerUnavailable(f"Phonetisaurus's {mode} step failed (exit {done.returncode}): {tail}")
    return json.loads(out.read_text())


def phonetisaurus(splits: dict[str, list[data.Entry]], orders: list[int]) -> dict:
    """Train Phonetisaurus at each order, choose one on dev, evaluate it on test: the JSON entry."""
    py = ensure_venv("phonetisaurus", "LOOPLIFT_PHONETISAURUS_VENV", "phonetisaurus-venv", [[PHONETISAURUS]],
                     "import phonetisaurus", torch=False)
    dev, test = splits["dev"], splits["test"]
    with tempfile.TemporaryDirectory(prefix="g2p-peer-") as tmp_name:
        tmp = Path(tmp_name)
        lexicon = tmp / "train.lexicon"
        lexicon.write_text("\n".join(lexicon_lines(splits["train"])) + "\n")
        print(f"[phonetisaurus] training at orders {', '.join(map(str, orders))} (its packaged recipe) ...",
              flush=True)
        trained = run_side(py, "train", {"lexicon": str(lexicon), "dir": str(tmp / "train"), "orders": orders,
                                         "dev_words": [e.word for e in dev]}, tmp)
        per_order, dev_scores = {}, {}
        for order in orders:
            t = trained["orders"][str(order)]
            hyps, missing = hypotheses(t["dev_pairs"], [e.word for e in dev])
            s = dev_scores[order] = metrics.score(hyps, [e.prons for e in dev])
            train_s = trained["align_s"] + t["ngram_s"] + t["convert_s"]
            per_order[order] = {"dev_wer": round(s.wer, 4), "dev_per": round(s.per, 4), "train_s": round(train_s, 1),
                                "ngram_s": round(t["ngram_s"], 1), "convert_s": round(t["convert_s"], 1),
                                "dev_missing": missing}
            print(f"[phonetisaurus] order {order}: dev WER {100 * s.wer:.2f}%, PER {100 * s.per:.2f}% "
                  f"(training {train_s:.0f} s)", flush=True)
        order = choose_order(dev_scores)
        decoded = run_side(py, "decode", {"model": trained["orders"][str(order)]["model"],
                                          "words": [e.word for e in test]}, tmp)
    hyps, missing = hypotheses(decoded["pairs"], [e.word for e in test])
    start = time.perf_counter()
    s = metrics.score(hyps, [e.prons for e in test])
    score_s = time.perf_counter() - start
    result = {"version": trained["version"], "test_wer": round(s.wer, 4), "test_per": round(s.per, 4),
              "order": order, "train_s": per_order[order]["train_s"], "align_s": round(trained["align_s"], 1),
              "decode_s": round(decoded["decode_s"], 2), "decode_words_per_s": round(len(test) / decoded["decode_s"]),
              "decode_startup_s": round(decoded["startup_s"], 2), "score_s": round(score_s, 2),
              "test_missing": missing, "threads": 1, "orders": {str(o): v for o, v in per_order.items()}}
    print(f"Phonetisaurus {result['version']}, order {order} (chosen on dev), trained in {result['train_s']:.0f} s "
          f"(alignment {result['align_s']:.0f} s): test ({len(test)} words) WER {100 * s.wer:.2f}%, "
          f"PER {100 * s.per:.2f}%; decoded in {decoded['decode_s']:.1f} s ({result['decode_words_per_s']} words/s, "
          f"{decoded['startup_s']:.2f} s of it starting the decoder and loading the model; 1 thread)", flush=True)
    return result


def training_seconds(run_dir: Path) -> float | None:
    """The run's training time by the trainer's clock (steps and dev evaluations), from its last.safetensors;
    None if it has none."""
    try:
        from safetensors import safe_open
        with safe_open(str(run_dir / "last.safetensors"), framework="pt") as f:
            return round(json.loads(f.metadata()["trainer/position"])["elapsed_seconds"], 1)
    except Exception:
        return None


def looplift_side(run_dir: Path, test: list[data.Entry]) -> dict:
    """``looplift-g2p eval`` of the model in `run_dir` on test (beam 5), timed as it times it: the JSON entry."""
    model, vocabs = recipe.load_model(run_dir)
    checkpoint = "best.safetensors" if (run_dir / "best.safetensors").exists() else "model.safetensors"
    start = time.perf_counter()
    s = recipe.evaluate(model, test, vocabs, beam=5)
    seconds = time.perf_counter() - start
    result = {"version": looplift.__version__, "dir": str(run_dir), "checkpoint": checkpoint,
              "test_wer": round(s.wer, 4), "test_per": round(s.per, 4), "train_s": training_seconds(run_dir),
              "beam": 5, "decode_s": round(seconds, 2), "decode_words_per_s": round(len(test) / seconds),
              "threads": torch.get_num_threads()}
    trained = f"trained {result['train_s'] / 60:.1f} min, " if result["train_s"] is not None else ""
    print(f"looplift {looplift.__version__} ({run_dir}/{checkpoint}, {trained}beam 5): test ({len(test)} words) "
          f"WER {100 * s.wer:.2f}%, PER {100 * s.per:.2f}%; decoded in {seconds:.1f} s "
          f"({result['decode_words_per_s']} words/s, {result['threads']} threads)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", default="6,7,8,9,10",
                        help="Phonetisaurus's n-gram orders to try on dev (comma-separated)")
    parser.add_argument("--looplift-dir", default="g2p-run",
                        help="a looplift-g2p training run (or checkpoint) to evaluate on test")
    parser.add_argument("--no-peer", action="store_true", help="skip Phonetisaurus")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for looplift (default: torch's)")
    args = parser.parse_args()
    orders = sorted({int(o) for o in args.orders.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = data.split(data.load(stress=False))
    print(f"split: {len(splits['train'])} training words ({sum(len(e.prons) for e in splits['train'])} "
          f"pronunciations), {len(splits['dev'])} dev, {len(splits['test'])} test; {os.cpu_count()} CPUs", flush=True)
    results: dict = {"test_words": len(splits["test"]),
                     "versions": {"looplift": looplift.__version__, "torch": torch.__version__,
                                  "python": platform.python_version()}}

    run_dir = Path(args.looplift_dir)
    try:
        if not run_dir.exists():
            raise FileNotFoundError(f"no looplift model at {run_dir}")
        results["looplift"] = looplift_side(run_dir, splits["test"])
    except (OSError, LoopliftError) as e:
        print(f"[looplift] skipped: {e}; train one with `looplift-g2p train --dir {run_dir} --minutes 60` "
              f"(or pass --looplift-dir)", flush=True)
        results["looplift"] = {"skipped": str(e)}

    if args.no_peer:
        results["phonetisaurus"] = {"skipped": "--no-peer"}
    else:
        try:
            results["phonetisaurus"] = phonetisaurus(splits, orders)
            results["versions"]["phonetisaurus"] = results["phonetisaurus"]["version"]
        except PeerUnavailable as e:
            print(f"[phonetisaurus] not compared: {e}", file=sys.stderr, flush=True)
            results["phonetisaurus"] = {"reason": str(e)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
