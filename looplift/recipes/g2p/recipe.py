"""The G2P recipe's pieces between the data, the model and the training driver: batches as named
tensors, the training loss, beam-search decoding, evaluation, and the model's checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

import looplift as ll
from looplift.errors import CheckpointError, ConfigError
from looplift.train.checkpoint import load as load_params
from looplift.train.trainer_state import AVERAGE_FILE, BEST_FILE, MODEL_FILE

from . import data, metrics
from .model import EOS, G2P, Config
from .transducer import TransducerConfig, TransducerG2P
from .transformer import TransformerConfig, TransformerG2P

#: the model classes by their config's ``arch``
ARCHS = {"lstm": (Config, G2P), "transformer": (TransformerConfig, TransformerG2P),
         "transducer": (TransducerConfig, TransducerG2P)}

SRC, TGT = ll.Dim("src"), ll.Dim("tgt")

#: words searched at once by default (batched by length): 512 for transducers, whose alignment steps (T + U of
#: them) then share their Python work among more words; 256 for the attention models, whose steps read every frame
#: (their working set outgrows the caches first)
DECODE_BATCH, TRANSDUCER_DECODE_BATCH = 256, 512


@dataclass
class Vocabs:
    chars: data.Vocab
    phonemes: data.Vocab
    stress: bool

    def metadata(self, config: Config | TransformerConfig | TransducerConfig) -> dict[str, str]:
        return {"looplift-g2p": "1", "arch": config.arch, "config": config.to_json(),
                "chars": self.chars.to_json(), "phonemes": self.phonemes.to_json(), "stress": json.dumps(self.stress)}


def build_model(config: Config | TransformerConfig | TransducerConfig) -> G2P | TransformerG2P | TransducerG2P:
    """The model of `config`'s architecture."""
    return ARCHS[config.arch][1](config)


def build_vocabs(entries: Sequence[data.Entry], *, stress: bool) -> Vocabs:
    return Vocabs(data.Vocab.build((e.word for e in entries), kind="character"),
                  data.Vocab.build((p for e in entries for p in e.prons), kind="phoneme"), stress)


def char_batch(model: G2P, words: Sequence[Sequence[int]]) -> ll.Named:
    x, n = data.encode_batch(list(words))
    return ll.Named(x, (ll.batch_dim, SRC), {SRC: n}, sparse_dim=model.chars)


def phoneme_batch(model: G2P, prons: Sequence[Sequence[int]]) -> ll.Named:
    """The phonemes as the model's targets: with EOS at the end, except for a model whose ``target_eos`` is
    False (the transducer: its blank ends a word)."""
    eos = [EOS] if getattr(model, "target_eos", True) else []
    y, n = data.encode_batch([list(p) + eos for p in prons])
    return ll.Named(y, (ll.batch_dim, TGT), {TGT: n}, sparse_dim=model.phonemes)


class Examples:
    """Training examples, one per pronunciation: encoded characters and phonemes."""

    def __init__(self, entries: Sequence[data.Entry], vocabs: Vocabs):
        self.chars: list[list[int]] = []
        self.prons: list[list[int]] = []
        for e in entries:
            word = vocabs.chars.encode(e.word)
            for p in e.prons:
                self.chars.append(word)
                self.prons.append(vocabs.phonemes.encode(p))

    def __len__(self) -> int:
        return len(self.chars)

    def lengths(self) -> list[int]:
        return [len(c) + len(p) for c, p in zip(self.chars, self.prons)]


def loss_function(examples: Examples):
    """The training driver's loss: summed cross-entropy of a batch (a list of example indices) and its
    number of target phonemes (the EOS included)."""
    programs: dict[int, ll.Program] = {}

    def loss_fn(model: G2P, batch: Sequence[int]):
        train = programs.get(id(model))
        if train is None:
            train = programs[id(model)] = ll.compile(model, mode="train")
        x = char_batch(model, [examples.chars[i] for i in batch])
        y = phoneme_batch(model, [examples.prons[i] for i in batch])
        return train(x, y, src=SRC, tgt=TGT).tensor, int(y.lengths[TGT].sum())

    return loss_fn


def decode(model: G2P, words: Sequence[Sequence[int]], *, beam: int = 5, batch_size: int | None = None,
           threshold: float | None = None, workers: int | None = None) -> list[list[tuple[list[int], float]]]:
    """The n-best (phoneme ids, log-probability) per word, best first, by batched beam search (keeping only
    the hypotheses within `threshold` of the best, if given: the beam then shrinks where the model is sure).

    Words are batched by length, `batch_size` to a batch (default: :func:`default_batch`). On CPU, `workers`
    batches are searched at once, each in a thread of its own running one torch thread (default: as many as
    torch's threads, at most 4): a search is many small steps, which use several cores better side by side than
    one at a time with the threads inside each op."""
    search = ll.compile(model, mode="search")
    batch_size = default_batch(model) if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"decode: batch_size must be a positive number of words, got {batch_size!r}")
    order = sorted(range(len(words)), key=lambda i: len(words[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    out: list = [None] * len(words)

    def decode_batch(idx: list[int]) -> None:
        with torch.inference_mode():   # (per thread, as grad mode)
            labels, scores, lengths, valid = search(char_batch(model, [words[i] for i in idx]), src=SRC, tgt=TGT,
                                                    beam=beam, threshold=threshold)
        (bdim,) = [d for d in valid.dims if d is not ll.batch_dim]
        (steps,) = [d for d in labels.dims if d is not ll.batch_dim and d is not bdim]
        ys = labels.align(ll.batch_dim, bdim, steps).tolist()   # (lists: no tensor per element)
        sc, n, ok = (v.align(ll.batch_dim, bdim).tolist() for v in (scores, lengths, valid))
        for row, i in enumerate(idx):
            out[i] = [([t for t in ys[row][k][:n[row][k]] if t != EOS], sc[row][k])
                      for k in range(len(ok[row])) if ok[row][k]]

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if workers is None:
        workers = min(torch.get_num_threads(), 4) if on_cpu else 1
    if workers > 1:
        batches = _finer_tail(batches, workers)
    was_training = model.training
    model.eval()
    # The n-best lists are many small objects and no cycles: the garbage collector, woken by their number,
    # would only walk everything else alive (the dictionary, the program), up to a tenth of the decoding.
    try:
        with data.paused_gc():
            if workers <= 1 or len(batches) <= 1:
                for idx in batches:
                    decode_batch(idx)
            else:
                decode_batch(batches[0][:1])   # (one word traces the program, before the threads share it)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    with ThreadPoolExecutor(workers) as pool:   # (the longest words first: none left alone)
                        list(pool.map(decode_batch, batches[::-1]))
                finally:
                    torch.set_num_threads(threads)
    finally:
        model.train(was_training)
    return out


def default_batch(model) -> int:
    """The words :func:`decode` searches at once by default for `model` (a model or an ensemble)."""
    members = getattr(model, "members", [model])
    return TRANSDUCER_DECODE_BATCH if all(isinstance(m, TransducerG2P) for m in members) else DECODE_BATCH


#: the last batches searched side by side are cut into this many parts each (see _finer_tail)
TAIL_PARTS = 2


def _finer_tail(batches: list[list[int]], workers: int) -> list[list[int]]:
    """`batches` (by length, shortest first, searched longest first) with the first `workers` of them, searched
    last, each cut into :data:`TAIL_PARTS`: a worker that finishes early waits for the others' last batch, and a
    smaller one ends sooner."""
    parts = []
    for idx in batches[:workers]:
        size = -(-len(idx) // TAIL_PARTS)
        parts += [idx[start:start + size] for start in range(0, len(idx), size)]
    return parts + batches[workers:]


def evaluate(model: G2P, entries: Sequence[data.Entry], vocabs: Vocabs, *, beam: int = 5,
             batch_size: int | None = None, threshold: float | None = None,
             workers: int | None = None) -> metrics.Scores:
    """PER and WER of the best hypothesis of each word against all its pronunciations (decoded as
    :func:`decode` decodes)."""
    with data.paused_gc():   # (until the n-best lists are scored and freed: see decode)
        nbest = decode(model, [vocabs.chars.encode(e.word) for e in entries], beam=beam, batch_size=batch_size,
                       threshold=threshold, workers=workers)
        hyps = [vocabs.phonemes.decode(hs[0][0]) if hs else [] for hs in nbest]
        del nbest
        return metrics.score(hyps, [e.prons for e in entries])


def save_model(model: G2P, vocabs: Vocabs, path: str | os.PathLike) -> None:
    ll.save(model, path, metadata=vocabs.metadata(model.config))


def load_model(path: str | os.PathLike, *, which: str = "best") -> tuple[G2P, Vocabs]:
    """The model and vocabularies of a G2P checkpoint: a file, or a training run's folder, whose
    ``best.safetensors`` (the best dev WER; `which` = "best", if the run kept one), ``average.safetensors``
    (the mean of the last epochs' models; `which` = "average") or ``model.safetensors`` (the last model) it
    reads."""
    from safetensors import safe_open
    path = os.fspath(path)
    if os.path.isdir(path):
        best = os.path.join(path, BEST_FILE)
        if which == "average":
            if not os.path.exists(os.path.join(path, AVERAGE_FILE)):
                raise CheckpointError(f"the run in {path!r} kept no average model: train it with --average K")
            path = os.path.join(path, AVERAGE_FILE)
        else:
            path = best if which == "best" and os.path.exists(best) else os.path.join(path, MODEL_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"no G2P model at {path!r}: train one first (looplift-g2p train --dir ...)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"cannot read the checkpoint {path!r}: {type(e).__name__}: {e}") from e
    if meta.get("looplift-g2p") != "1":
        raise CheckpointError(f"{path!r} is not a looplift G2P model (its metadata lacks the model config)")
    try:
        config_cls, _ = ARCHS[meta.get("arch", "lstm")]
        config = config_cls.from_json(meta["config"])
        vocabs = Vocabs(data.Vocab.from_json(meta["chars"]), data.Vocab.from_json(meta["phonemes"]),
                        json.loads(meta["stress"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint {path!r} has broken G2P metadata: {e}") from e
    model = build_model(config)
    load_params(model, path)
    model.eval()
    return model, vocabs
