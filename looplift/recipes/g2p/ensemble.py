"""Several trained G2P models decoding together, written once like each of them.

Each member encodes the word its own way; one decoder loop steps every member's
decoder (``decoder_step``) after the same phoneme, and the next phoneme is chosen
(``looplift.choice``) by the mean of the members' log-probabilities, the score of
a hypothesis being the mean of the members' scores. Members may differ in
architecture (the attention LSTM and the Transformer), not in their vocabularies.

Transducers search alignments instead (:class:`TransducerEnsemble`): one
alignment-synchronous search steps every member's prediction network after the
same labels, and the mean of the members' joint log-probabilities picks each
symbol, blank included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import looplift as ll

from .model import decoder_loop, next_phoneme, result
from .transducer import alignment_search

__all__ = ["Ensemble", "TransducerEnsemble"]


class Ensemble(ll.Module):
    """``labels, scores, lengths, valid = ensemble(chars, src=..., tgt=..., beam=k)`` in search mode, as one
    model's; in train/eval mode the loss of the mean log-probabilities. The members' vocabularies are declared
    the same dims as the first member's (build the ensemble before compiling anything with them)."""

    def __init__(self, members: Sequence[ll.Module]):
        super().__init__()
        _same_vocabularies(members)
        self.members = torch.nn.ModuleList(members)
        self.chars, self.phonemes = members[0].chars, members[0].phonemes

    def forward(self, chars, phonemes=None, *, src: ll.Dim, tgt: ll.Dim, beam: int = 1,
                max_len: int | None = None, threshold: float | None = None):
        memories = [m.encode(chars, src=src) for m in self.members]
        loop = decoder_loop(self.phonemes, src=src, tgt=tgt, max_len=max_len)
        states = {}
        for k, m in enumerate(self.members):
            state = m.decoder_state(memories[k])
            if state is not None:
                states[k] = f"member{k}"
                setattr(loop.state, states[k], state)
        with loop:
            total = None
            for k, (m, memory) in enumerate(zip(self.members, memories)):
                state = getattr(loop.state, states[k]) if k in states else None
                log_probs, state = m.decoder_step(state, loop.state.label, memory, src=src, index=loop.index)
                if k in states:
                    setattr(loop.state, states[k], state)
                total = log_probs if total is None else total + log_probs
            mean = total * (1.0 / len(self.members))
            stacked = next_phoneme(loop, mean, phonemes, axis=self.phonemes, beam=beam, threshold=threshold,
                                   label_smoothing=0.0)
        return result(loop, stacked)


class TransducerEnsemble(Ensemble):
    """``labels, scores, lengths, valid = ensemble(chars, src=..., tgt=..., beam=k)`` in search mode, as one
    transducer's (:func:`looplift.recipes.g2p.transducer.alignment_search` over all members; at most as many
    phonemes per character as the first member allows). It only searches: each member is trained alone. The
    members' vocabularies are declared the same dims as the first member's (build the ensemble before
    compiling anything with them)."""

    #: the targets are the phonemes alone (the blank ends a word), as a transducer's
    target_eos = False

    def forward(self, chars, phonemes=None, *, src: ll.Dim, tgt: ll.Dim, beam: int = 1,
                max_len: int | None = None, threshold: float | None = None):
        if not ll.is_search():
            raise ValueError("an ensemble of transducers only searches (compile it with mode='search'); train "
                             "each member alone")
        limit = self.members[0].config.max_labels
        max_len = (limit + 1) * ll.length(src) if max_len is None else max_len
        encs = [m.encode(chars, src=src) for m in self.members]
        return alignment_search(list(self.members), encs, self.phonemes, frames=src, steps=tgt, max_labels=limit,
                                beam=beam, max_len=max_len, threshold=threshold)


def _same_vocabularies(members: Sequence[ll.Module]) -> None:
    """Declares the members' character and phoneme dims the same as the first member's (an error where their
    sizes differ)."""
    if not members:
        raise ValueError("an ensemble needs at least one model")
    first = members[0]
    for m in members[1:]:
        if (m.chars.size, m.phonemes.size) != (first.chars.size, first.phonemes.size):
            raise ValueError(f"the ensemble's models differ in their vocabularies: {m.chars.size} characters "
                             f"and {m.phonemes.size} phonemes, against {first.chars.size} and "
                             f"{first.phonemes.size}")
        m.chars.declare_same_as(first.chars)
        m.phonemes.declare_same_as(first.phonemes)
