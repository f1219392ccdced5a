"""ESPnet side of ``benchmarks/beam_search.py``: the same model decoded by ESPnet's ``BatchBeamSearch``.

Run ONLY with the python of the separate ESPnet virtual environment that ``beam_search.py`` builds
(ESPnet is no dependency of looplift; nothing in the project or its tests imports this file)::

    python _espnet_side.py PAYLOAD.pt

PAYLOAD.pt (written by ``beam_search.py`` with ``torch.save``) holds plain tensors: the model's weights by
parameter name, the padded source batch ``src`` and its lengths ``src_len``, and a config dict (beam,
vocab, eos, max_len, threads). The model is rebuilt here in plain PyTorch: a label-embedding + BiLSTM
encoder; an LSTM decoder fed ``[embedding(previous label), previous attention context]``, dot attention of
``query(h)`` over the encoder output, readout of ``[h, context]``, log-softmax. The decoder is wrapped as an
ESPnet ``BatchScorerInterface`` the way ESPnet's own decoders are (cf. the Transformer decoder's
``batch_score``): a state per hypothesis (here ``(h, c, context)``), stacked into a batch over the running
hypotheses for one step, then split back into a list of per-hypothesis states.

ESPnet decodes ONE UTTERANCE AT A TIME (that is how it is used: ``Speech2Text`` / ``asr_inference`` call
the beam search once per utterance; "batch" in ``BatchBeamSearch`` is the batch of running hypotheses
of that utterance). So each round here encodes and decodes the utterances one after another; its time
is that of decoding all of them, comparable to one call of looplift's search on the whole batch.

The search is a plain beam search: one full scorer ("decoder", weight 1.0), no partial scorers, so no
pre-beam; ``sos = eos = EOS``; ``maxlenratio = -max_len`` (a fixed maximum length and no
``end_detect``), ``minlenratio = 0``.

Protocol (stdout, one line each, prefixed with ``@@ ``, JSON):
  first ``{"espnet_version", "torch_version", "threads", "best": [{"labels", "score", "n_ended"}, ...]}``
  after one decode of every utterance; ``labels`` drops the ``sos`` and the EOS that ESPnet appends to
  hypotheses still running at ``max_len`` (an EOS the model chose is kept, as looplift keeps it); then for
  each line ``run`` on stdin one timed round ``{"time": seconds}``; ``quit`` or end of input ends it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from importlib import metadata

import torch
import torch.nn.functional as F
from espnet.nets.batch_beam_search import BatchBeamSearch
from espnet.nets.scorer_interface import BatchScorerInterface


class AttLSTMDecoder(BatchScorerInterface):
    """The benchmark's decoder as an ESPnet batch scorer; ``x`` is one utterance's encoder output (T, enc)."""

    def __init__(self, w: dict[str, torch.Tensor]):
        self.emb = w["emb.weight"]
        self.w_ih, self.w_hh = w["cell.weight_ih_l0"], w["cell.weight_hh_l0"]
        self.bias = w["cell.bias_ih_l0"] + w["cell.bias_hh_l0"]
        self.q_w, self.q_b = w["query.weight"], w["query.bias"]
        self.r_w, self.r_b = w["readout.weight"], w["readout.bias"]
        self.dec = self.w_hh.shape[1]

    def init_state(self, x: torch.Tensor):
        """(h, c, context) of one hypothesis, all zeros."""
        h = x.new_zeros(self.dec)
        return h, torch.zeros_like(h), x.new_zeros(x.shape[-1])

    def batch_init_state(self, x: torch.Tensor):
        return self.init_state(x)

    def select_state(self, state, i: int, new_id: int | None = None):
        """``state`` is the list of per-hypothesis states that ``batch_score`` returned."""
        return None if state is None else state[i]

    def score(self, y: torch.Tensor, state, x: torch.Tensor):
        """One hypothesis (used by the non-batch ``BeamSearch``); the same computation."""
        logp, states = self.batch_score(y[None], [state], x[None])
        return logp[0], states[0]

    def batch_score(self, ys: torch.Tensor, states: list, xs: torch.Tensor):
        """ys (n_hyp, ylen) prefixes, states one per hypothesis, xs (n_hyp, T, enc) -> (n_hyp, vocab) log-probs."""
        h = torch.stack([s[0] for s in states])
        c = torch.stack([s[1] for s in states])
        ctx = torch.stack([s[2] for s in states])
        x_in = torch.cat([F.embedding(ys[:, -1], self.emb), ctx], -1)
        gates = x_in @ self.w_ih.T + h @ self.w_hh.T + self.bias
        i, f, g, o = gates.chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        q = h_new @ self.q_w.T + self.q_b                                          # (n_hyp, enc)
        att = torch.softmax(torch.einsum("nte,ne->nt", xs, q), -1)
        ctx_new = torch.einsum("nt,nte->ne", att, xs)
        logp = torch.log_softmax(torch.cat([h_new, ctx_new], -1) @ self.r_w.T + self.r_b, -1)
        return logp, [(h_new[k], c_new[k], ctx_new[k]) for k in range(len(states))]


class Encoder:
    def __init__(self, w: dict[str, torch.Tensor]):
        self.src_emb = w["src_emb.weight"]
        hidden = w["encoder.weight_hh_l0"].shape[1]
        self.lstm = torch.nn.LSTM(self.src_emb.shape[1], hidden, bidirectional=True, batch_first=True)
        self.lstm = self.lstm.to(self.src_emb.dtype)
        self.lstm.load_state_dict({n[len("encoder."):]: p for n, p in w.items() if n.startswith("encoder.")})

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        """src (T,) labels of one utterance, unpadded -> (T, enc)."""
        return self.lstm(F.embedding(src, self.src_emb)[None])[0][0]


def emit(obj) -> None:
    print("@@ " + json.dumps(obj), flush=True)


def main() -> None:
    payload = torch.load(sys.argv[1], weights_only=True)
    cfg = payload["config"]
    torch.set_num_threads(int(cfg["threads"]))
    logging.getLogger("espnet").setLevel(logging.ERROR)   # its per-utterance max-length warning
    w = payload["weights"]
    utterances = [payload["src"][b, : int(n)] for b, n in enumerate(payload["src_len"])]
    encoder, eos, max_len = Encoder(w), int(cfg["eos"]), int(cfg["max_len"])
    search = BatchBeamSearch(scorers={"decoder": AttLSTMDecoder(w)}, weights={"decoder": 1.0},
                             beam_size=int(cfg["beam"]), vocab_size=int(cfg["vocab"]), sos=eos, eos=eos,
                             pre_beam_score_key=None)

    def decode_all():
        with torch.no_grad():
            return [search(x=encoder(src), maxlenratio=-float(max_len), minlenratio=0.0) for src in utterances]

    best = []
    for nbest in decode_all():
        labels = nbest[0].yseq[1:].tolist()[:max_len]    # drop sos, and the EOS appended at max_len
        best.append({"labels": labels, "score": float(nbest[0].score), "n_ended": len(nbest)})
    emit({"espnet_version": metadata.version("espnet"), "torch_version": torch.__version__,
          "threads": torch.get_num_threads(), "best": best})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        decode_all()
        emit({"time": time.perf_counter() - start})


if __name__ == "__main__":
    main()
