"""The sentences the speech recipe speaks: the English dialogues of the ``chatterbot-corpus`` package.

They are natural, everyday English (questions and answers on greetings, food,
science, history, ...) in a package on PyPI, so nothing is downloaded at run
time. Each line of a dialogue is normalized to what a recognizer writes:
lowercase letters, apostrophes within words and single spaces; lines with digits are left
out (eSpeak would read "1984" as words the transcript lacks), as are lines of
fewer than 2 or more than 20 words. That leaves 1,526 distinct sentences of 6.9
words on average.

A sentence's part (train, dev or test) comes from the SHA-256 of its text, as
the G2P split does, so test sentences are never trained on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re

from looplift.errors import ConfigError

__all__ = ["ALPHABET", "normalize", "sentences", "split_of", "split"]

#: the characters of a transcript (besides the blank or end symbols a model adds)
ALPHABET = " '" + "abcdefghijklmnopqrstuvwxyz"

_ITEM = re.compile(r"^\s*(?:- )+(.*)$")


def normalize(text: str) -> str | None:
    """`text` as a transcript (lowercase letters, apostrophes, single spaces), or None if it has digits or
    fewer than 2 or more than 20 words."""
    text = text.strip().strip("\"'").lower()
    if re.search(r"[0-9]", text):
        return None
    text = re.sub(r"[^a-z' ]+", " ", text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)    # (an apostrophe only within a word: "don't")
    text = re.sub(r"\s+", " ", text).strip()
    words = text.split()
    return " ".join(words) if 2 <= len(words) <= 20 else None


def _corpus_files() -> list:
    try:
        root = importlib.resources.files("chatterbot_corpus") / "data" / "english"
    except ModuleNotFoundError:
        raise ConfigError("the speech recipe needs the chatterbot-corpus package: pip install looplift[speech]") \
            from None
    return sorted((f for f in root.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name)


@functools.cache
def sentences() -> tuple[str, ...]:
    """Every distinct normalized sentence of the corpus's English dialogues, sorted."""
    found = set()
    for f in _corpus_files():
        in_dialogues = False
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.startswith("conversations:"):
                in_dialogues = True
                continue
            match = _ITEM.match(line) if in_dialogues else None
            if match and (text := normalize(match.group(1))):
                found.add(text)
    return tuple(sorted(found))


def split_of(text: str, *, dev: float = 0.1, test: float = 0.1) -> str:
    """"train", "dev" or "test": the first 8 bytes of the SHA-256 of the text as a number u in [0, 1); test if
    u < `test`, dev if u < `test` + `dev`, else train."""
    u = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if u < test else "dev" if u < test + dev else "train"


def split(texts, *, dev: float = 0.1, test: float = 0.1) -> dict[str, list[str]]:
    """`texts` by part (see :func:`split_of`), each in the order given."""
    parts: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for t in texts:
        parts[split_of(t, dev=dev, test=test)].append(t)
    return parts
