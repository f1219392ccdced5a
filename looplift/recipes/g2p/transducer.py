"""The transducer (RNN-T) variant of the G2P model: characters as encoder frames, phonemes as labels.

A word may need several phonemes for one character ("x": K S) or none ("gh" in "night"): a transducer
emits, at each character, labels until it emits the blank and moves on. Phoneme 0 (``<eos>`` in the other
models) is the blank here.

Trained with the full-sum loss (``looplift.rnnt_loss``), written over named dims: the encoder over the
characters ``src``, the prediction network as a loop over the label prefixes ``tgt + 1`` (the loop
optimizer turns it into one fused LSTM), and the joint by broadcasting the two into ``{batch, src,
tgt + 1, phonemes}``. Searched with the same parameters as an alignment-synchronous beam search: a loop
over alignment steps with the character position ``t`` as a state, the prediction LSTM stepping under a
``MaskedComputation`` where the last symbol was a label, at most ``max_labels`` phonemes per character,
and the hypotheses that reach the same character with the same phonemes merged (log-sum-exp: the sum over
their alignments).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import looplift as ll
from looplift import nn

from .model import JsonConfig

BLANK = 0


@dataclass
class TransducerConfig(JsonConfig):
    """The transducer's sizes and regularization (stored in checkpoints as JSON)."""

    n_chars: int
    n_phonemes: int
    emb: int = 64
    enc: int = 256            # per layer, both directions together
    enc_layers: int = 2
    pred: int = 256           # the prediction network's width (its LSTM's, or its context sum's)
    pred_context: int = 0     # 0: an LSTM over all labels so far; k: the last k labels alone (no recurrence)
    joint: int = 256
    dropout: float = 0.0      # on the embeddings, between encoder layers and on the joint's two inputs
    max_labels: int = 3       # phonemes per character at most, in search
    arch = "transducer"


class TransducerG2P(ll.Module):
    """``loss = model(chars, phonemes, src=..., tgt=...)`` in train/eval mode (summed over the batch; the
    phonemes without an end symbol), and ``labels, scores, lengths, valid = model(chars, src=..., tgt=...,
    beam=k)`` in search mode (the labels over alignment steps, blanks included)."""

    #: the targets are the phonemes alone (the blank ends a word; no end symbol)
    target_eos = False

    def __init__(self, config: TransducerConfig):
        super().__init__()
        self.config = c = config
        self.chars, self.phonemes = ll.Dim("chars", c.n_chars), ll.Dim("phonemes", c.n_phonemes)
        self.char_emb_dim, self.emb_dim = ll.Dim("char_emb", c.emb), ll.Dim("phoneme_emb", c.emb)
        self.enc_dim, self.pred_dim, self.joint_dim = ll.Dim("enc", c.enc), ll.Dim("pred", c.pred), \
            ll.Dim("joint", c.joint)
        self.char_emb = nn.Embedding(self.chars, self.char_emb_dim)
        self.encoder = nn.LSTM(self.char_emb_dim, self.enc_dim, bidirectional=True, num_layers=c.enc_layers,
                               dropout=c.dropout)
        self.dropout = nn.Dropout(c.dropout)
        if c.pred_context:
            # stateless: relu(sum_k E_k[label k back]), an embedding per position of the context
            for k in range(c.pred_context):
                setattr(self, f"context{k}", nn.Embedding(self.phonemes, self.pred_dim))
        else:
            self.emb = nn.Embedding(self.phonemes, self.emb_dim)
            self.pred = nn.LSTM(self.emb_dim, self.pred_dim)
        self.from_enc = nn.Linear(self.enc_dim, self.joint_dim)
        self.from_pred = nn.Linear(self.pred_dim, self.joint_dim)
        self.readout = nn.Linear(self.joint_dim, self.phonemes)

    def joint(self, enc, pred):
        """The joint's logits over the phonemes, from projections of the encoding and the prediction output
        (any dims: broadcast over both). (Dropout is on its inputs, before the broadcast: on the joint itself,
        {batch, src, tgt + 1, joint}, it would cost more than the rest of a training step.)

        In a search its inputs are twice the projections (:meth:`into_joint`), and the joint is one sigmoid:
        ``tanh(z) = 2 sigmoid(2 z) - 1``, with the 2 and the -1 folded into the readout's weight and bias. The
        same function (to float rounding), which torch's CPU kernels compute 3-6x faster than tanh, in one
        pass over the hypotheses where the identity written out takes four: the joint is most of a search
        step's work. Training keeps ``tanh``, whose backward is cheaper."""
        if not ll.is_search():
            return self.readout(ll.tanh(enc + pred))
        r = self.readout
        return ll.linear(ll.sigmoid(enc + pred), r.weight * 2.0, r.bias - ll.sum(r.weight, axis=r.in_dim),
                         in_dim=r.in_dim, out_dim=r.out_dim)

    def into_joint(self, projection: nn.Linear, x):
        """`x` projected into the joint by `projection` (``from_enc``, ``from_pred``); in a search, twice that
        (the scale folded into the projection's weight and bias), as :meth:`joint` takes it there."""
        if not ll.is_search():
            return projection(x)
        return ll.linear(x, projection.weight * 2.0, projection.bias * 2.0, in_dim=projection.in_dim,
                         out_dim=projection.out_dim)

    def encode(self, chars, *, src: ll.Dim):
        """The characters' encoding projected into the joint (:meth:`into_joint`): ``{batch, src, joint}``."""
        enc, _ = self.encoder(self.dropout(self.char_emb(chars)), axis=src)
        return self.into_joint(self.from_enc, self.dropout(enc))

    def forward(self, chars, phonemes=None, *, src: ll.Dim, tgt: ll.Dim, beam: int = 1,
                max_len: int | None = None, threshold: float | None = None):
        enc = self.encode(chars, src=src)
        if ll.is_search():
            return self._search(enc, src=src, tgt=tgt, beam=beam, max_len=max_len, threshold=threshold)
        pred, prefix = self.predict(phonemes, tgt=tgt)
        logits = self.joint(enc, pred)                       # {batch, src, tgt + 1, phonemes}
        loss = ll.rnnt_loss(logits, phonemes, blank=BLANK, enc_time=src, prefix=prefix, axis=self.phonemes)
        return ll.sum(loss, axis=ll.batch_dim)

    def predict(self, phonemes, *, tgt: ll.Dim):
        """``pred, prefix``: the prediction network over the prefixes of 0..U `phonemes` (the blank stands for
        the start), projected into the joint: ``{batch, prefix, joint}`` with ``prefix = tgt + 1``."""
        prefix = tgt + 1
        inputs = ll.pad(phonemes, axis=tgt, left=1, value=BLANK)
        if self.config.pred_context:
            context = [inputs]
            while len(context) < self.config.pred_context:
                context.append(ll.shift_right(context[-1], axis=prefix, initial=BLANK))
            return self.from_pred(self.dropout(self._stateless(context))), prefix
        loop = ll.Loop(axis=prefix)
        loop.state.lstm = self.pred.default_initial_state()
        with loop:
            h, loop.state.lstm = self.pred(self.emb(loop.unstack(inputs)), state=loop.state.lstm)
            pred = loop.stack(self.from_pred(self.dropout(h)))
        return pred, prefix

    def _stateless(self, context):
        """The stateless prediction network's output from the last labels (`context[k]`: k labels back)."""
        total = None
        for k, labels in enumerate(context):
            e = getattr(self, f"context{k}")(labels)
            total = e if total is None else total + e
        return ll.relu(total)

    def prediction_start(self):
        """The prediction network's state before the first label: an LSTM's state, or the labels of the
        context but the last one (blanks)."""
        if self.config.pred_context:
            return tuple(ll.full(BLANK, sparse_dim=self.phonemes) for _ in range(self.config.pred_context - 1))
        return lstm_prediction_start(self)

    def prediction_step(self, label, state, table=None):
        """``projection, state``: the prediction network's output after `label`, projected into the joint
        (:meth:`into_joint`; `table`: :meth:`label_table`'s, for an LSTM)."""
        if self.config.pred_context:
            context = (label, *state)
            return self.into_joint(self.from_pred, self._stateless(context)), context[:-1]
        h, state = lstm_output_step(self, label, state, table)
        return self.into_joint(self.from_pred, h), state

    def label_table(self):
        """The prediction LSTM's :func:`lstm_label_table` (None for a stateless prediction network)."""
        return None if self.config.pred_context else lstm_label_table(self)

    def _search(self, enc, *, src: ll.Dim, tgt: ll.Dim, beam: int, max_len: int | None,
                threshold: float | None):
        c = self.config
        max_len = (c.max_labels + 1) * ll.length(src) if max_len is None else max_len
        return alignment_search(self, enc, self.phonemes, frames=src, steps=tgt, max_labels=c.max_labels, beam=beam,
                                max_len=max_len, threshold=threshold)


def alignment_search(model, enc, labels: ll.Dim, *, frames: ll.Dim, steps: ll.Dim, max_labels: int, beam: int,
                     max_len, threshold: float | None = None, table: bool = True):
    """A transducer's alignment-synchronous beam search, over the projected encoder frames `enc` (over
    `frames`): a loop over alignment steps (`steps`) with the frame position ``t`` as a state, the prediction
    network (the model's ``prediction_start`` and ``prediction_step`` where it has them; else the LSTM
    ``model.pred`` on ``model.emb`` of the last label) and its projection ``model.from_pred`` stepping
    under a ``MaskedComputation`` where the last symbol was a label (the executor runs them on those hypotheses
    alone), ``model.joint(frame, projection)`` scoring `labels` (the blank is 0), at most `max_labels` labels
    per frame, and the hypotheses that reach the same frame with the same labels merged (log-sum-exp: the sum
    over their alignments). Returns the search's ``(labels over steps, blanks included; scores, lengths,
    valid)``.

    An ensemble: `model` and `enc` are sequences (the models, each one's encoding). Each model steps its own
    prediction LSTM after the same labels and scores its own frames; the mean of their log-probabilities
    picks the labels (and is a hypothesis' score).

    `table`: the LSTM's input projection of a label's embedding (with its biases) is a table over the labels,
    made once before the loop, that each step gathers rows of (``LSTM.step_from_gates``): a fifth of the
    step's product for an embedding of 64 and an LSTM of 256. False: the embedding, then the LSTM step, as
    in training (the same values, but for rounding)."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    encs = list(enc) if isinstance(enc, (list, tuple)) else [enc]
    if len(models) != len(encs):
        raise ValueError(f"alignment_search: {len(models)} models and {len(encs)} encodings")
    start, step, label_table = zip(*map(_prediction_network, models))
    tables = [make() if table else None for make in label_table]
    loop = ll.Loop(axis=steps, max_seq_len=max_len)
    loop.state.t = ll.zeros([], dtype="int64")
    loop.state.label = ll.full(BLANK, sparse_dim=labels)
    loop.state.started = ll.full(False)
    loop.state.pred = tuple(make() for make in start)
    loop.state.emitted = ll.zeros([], dtype="int64")
    loop.state.history = ll.search.label_history_start()
    with loop:
        # the prediction networks step on the start (the blank), then on each label emitted
        with ll.MaskedComputation(mask=(loop.state.label != BLANK) | ~loop.state.started):
            states, preds = [], []
            for predict, tab, state in zip(step, tables, loop.state.pred):
                pred, state = predict(loop.state.label, state, tab)
                states.append(state)
                preds.append(pred)   # (in the block: projected only where the prediction network stepped)
            loop.state.pred = tuple(states)
        loop.state.started = ll.full(True)
        log_probs = None
        for m, e, pred in zip(models, encs, preds):
            frame = ll.gather(e, index=loop.state.t, axis=frames)
            one = ll.log_softmax(m.joint(frame, pred), axis=labels)
            log_probs = one if log_probs is None else log_probs + one
        if len(models) > 1:
            log_probs = log_probs * (1.0 / len(models))
        log_probs = ll.search.limit_labels_per_frame(log_probs, loop.state.emitted, limit=max_labels, blank=BLANK,
                                                     axis=labels)
        label = ll.choice(log_probs, beam_size=beam, axis=labels, threshold=threshold)
        loop.state.label = label
        loop.state.t = loop.state.t + ll.cast(label == BLANK, "int64")
        loop.state.emitted = ll.search.labels_since_blank(loop.state.emitted, label, blank=BLANK)
        loop.state.history = ll.search.label_history(loop.state.history, label, ignore=BLANK)
        ll.search.merge([loop.state.t, loop.state.history, loop.state.emitted], mode="logsumexp")
        loop.end(loop.state.t >= ll.length(frames), include_eos=True)
        stacked = loop.stack(label)
    return stacked, loop.search.scores, loop.search.lengths, loop.search.valid


def _prediction_network(model):
    """``start, step, label_table`` of `model`'s prediction network: its own, or the LSTM of ``pred``, ``emb``
    and ``from_pred``."""
    if hasattr(type(model), "prediction_step"):
        return model.prediction_start, model.prediction_step, model.label_table
    return (functools.partial(lstm_prediction_start, model), functools.partial(lstm_prediction_step, model),
            functools.partial(lstm_label_table, model))


def lstm_prediction_start(model):
    """The state of `model`'s prediction LSTM (``model.pred``) before the first label."""
    return model.pred.default_initial_state()


def lstm_prediction_step(model, label, state, table=None):
    """``projection, state``: `model`'s prediction LSTM after `label` (:func:`lstm_output_step`), projected into
    the joint (``model.from_pred``)."""
    h, state = lstm_output_step(model, label, state, table)
    return model.from_pred(h), state


def lstm_output_step(model, label, state, table=None):
    """``h, state``: `model`'s prediction LSTM (``model.pred`` on ``model.emb`` of the label, or on the label's
    row of `table`) after `label`."""
    if table is not None:
        return model.pred.step_from_gates(ll.gather(table, index=label, axis=model.emb.vocab), state, bias=False)
    return model.pred(model.emb(label), state)


def lstm_label_table(model):
    """``{labels, gates}``: the prediction LSTM's input projection of each label's embedding, with its
    biases."""
    pred = model.pred
    return ll.dot(model.emb.weight, pred.weight_ih_l0, reduce=model.emb.out_dim) + pred.bias_ih_l0 + pred.bias_hh_l0
