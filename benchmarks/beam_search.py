"""Beam search of an attention LSTM encoder-decoder: looplift's search vs one hand-written for this model, and ESPnet's.

The model (random weights): a label-embedding + BiLSTM encoder, an LSTM decoder whose attention context
is fed back, a readout to the vocabulary; EOS (label 0) ends a hypothesis. Decoded three ways, on CPU:

* looplift: the decoder written once as a loop with ``looplift.choice``, compiled with
  ``mode="search"`` (the same module trains with ``mode="train"``);
* hand-written: a batched beam search in vectorized PyTorch for this exact model (states over
  (batch, beam), top-k over (beam x vocab), gathers by the source beams, backtracking): the floor of model
  compute plus top-k. Same process; the n-best lists (labels, lengths, scores) are asserted identical;
* ESPnet: ``espnet.nets.batch_beam_search.BatchBeamSearch`` (a plain beam search: one full scorer, no
  pre-beam, ``sos = eos = EOS``, a fixed max length ``maxlenratio = -max_len``) over the same model, rebuilt
  in plain PyTorch from the weights saved here and wrapped as an ESPnet ``BatchScorerInterface``
  (``benchmarks/_espnet_side.py``). ESPnet decodes ONE UTTERANCE AT A TIME (as it is used; its "batch" is the
  running hypotheses of one utterance), so its time is that of encoding + decoding the utterances one after
  another. It runs in a subprocess with the python of a virtual environment of its own -- ESPnet is no
  dependency of looplift -- in ``$LOOPLIFT_ESPNET_VENV`` or else ``~/.cache/looplift-bench/espnet-venv``
  (``$XDG_CACHE_HOME`` is honoured), built on first use (a minute or two, progress printed): ``torch`` of this
  process's version (``pip install torch==X.Y.Z``; where pip has no CPU wheel of it at hand it may download
  the CUDA build), ``pip install --no-deps espnet==202511``, then only what its beam search imports (numpy,
  packaging). A venv at ``$LOOPLIFT_ESPNET_VENV`` that this script did not build is used as it is if it can
  import ESPnet, and never deleted. Its rounds are interleaved with rounds of looplift (run again for that),
  both in the same number of threads; medians after the same warm-up. Nothing about ESPnet is asserted: the
  script prints for how many utterances ESPnet's best hypothesis equals looplift's best (labels, and score
  within 1e-4). ``--no-espnet`` skips it; if the venv cannot be built or the subprocess fails, the other
  results are still printed, with ``"espnet_vs_looplift": null`` and an ``"espnet_reason"``.

How ESPnet's search differs from looplift's (and the hand-written one's):

* ended hypotheses: ESPnet takes the top k of the expansions of its running hypotheses, moves those that
  end in EOS to a separate list, and goes on with the rest (fewer than k, refilled to k at the next step); its
  result is the best of all hypotheses that ever ended. In looplift an ended hypothesis keeps its place in
  the beam and competes with the running ones until k better ones push it out, and the best is the best
  of the final beam. The two can pick different best hypotheses (an ended one pushed out of looplift's
  beam can still win in ESPnet). Runs so far: with the default options, ``--eos-bias`` 0.05 to 1 and
  ``--peak`` up to 30, the best agreed on all 16 utterances (scores to ~1e-14); with peaked outputs
  (``--peak 100``, ``--peak 300 --eos-bias 10``) on 13 to 15 of 16, and each time the difference was that:
  ESPnet's best had ended after 1 or 2 labels, scored higher than looplift's best, and was no longer in
  looplift's n-best.
* stopping: looplift stops when all k entries of the beam have ended (none running can beat them any more:
  scores only fall) or at ``max_len``; ESPnet with a fixed max length stops only when no hypothesis is
  running or at ``max_len`` (its ``end_detect`` heuristic works only with ``maxlenratio=0``, which sets
  the max length to the input length instead). With a strong ``--eos-bias`` looplift stops after a few steps
  and ESPnet does not, so the time ratio there says more about that rule than about the search.
* ``max_len``: hypotheses still running at ``max_len`` get an EOS appended by ESPnet, without its score;
  looplift's have no EOS. The comparison drops that EOS (an EOS the model chose is kept on both sides).

With the default options every hypothesis of the n-best runs to ``max_len``. With random weights the best hypothesis
is mostly either EOS alone or one that runs to ``max_len`` (``--eos-bias 0.1``: a mean length of about 20
over the n-best, but every best is EOS alone); ``--peak 300 --eos-bias 10`` gives best hypotheses of
lengths from 1 to 30, 12 and 16 among them.

The last line is one JSON object: ``{"search_vs_handwritten": ratio of median times, "utterances_per_s":
looplift's, "espnet_vs_looplift": ESPnet's median time / looplift's for the same utterances,
"espnet_best_agree": utterances whose best hypotheses agree}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import looplift as ll
from looplift import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peer_venv import PeerUnavailable, ensure_venv  # noqa: E402  (the benchmarks' shared helper)

B = ll.batch_dim
EOS = 0

ESPNET = "espnet==202511"                # installed with --no-deps
ESPNET_IMPORTS = ["numpy", "packaging"]  # what espnet.nets.batch_beam_search imports besides torch and espnet
ESPNET_SIDE = Path(__file__).with_name("_espnet_side.py")


class Seq2Seq(ll.Module):
    def __init__(self, src_vocab: ll.Dim, vocab: ll.Dim, *, emb: int, enc: int, dec: int, beam: int, max_len: int,
                 threshold: float | None = None):
        super().__init__()
        self.vocab, self.beam, self.max_len, self.threshold = vocab, beam, max_len, threshold
        self.src_emb_dim, self.emb_dim = ll.Dim("src_emb", emb), ll.Dim("emb", emb)
        self.enc_dim, self.dec_dim, self.att = ll.Dim("enc", enc), ll.Dim("dec", dec), ll.Dim("att", enc)
        self.src_emb = nn.Embedding(src_vocab, self.src_emb_dim)
        self.encoder = nn.LSTM(self.src_emb_dim, self.enc_dim, bidirectional=True)
        self.emb = nn.Embedding(vocab, self.emb_dim)
        self.cell = nn.LSTM(self.emb_dim + self.enc_dim, self.dec_dim)
        self.query = nn.Linear(self.dec_dim, self.enc_dim)
        self.readout = nn.Linear(self.dec_dim + self.enc_dim, vocab)

    def forward(self, src, target=None, *, src_time, tgt_time):
        enc, _ = self.encoder(self.src_emb(src), axis=src_time)
        loop = ll.Loop(axis=tgt_time, max_seq_len=self.max_len)
        loop.state.label = ll.full(EOS, sparse_dim=self.vocab)
        loop.state.lstm = self.cell.default_initial_state()
        loop.state.ctx = ll.zeros([self.enc_dim])
        with loop:
            x = ll.concat(self.emb(loop.state.label), loop.state.ctx, axis=[self.emb_dim, self.enc_dim])
            h, loop.state.lstm = self.cell(x, state=loop.state.lstm)
            att = ll.softmax(ll.dot(enc, self.query(h), reduce=self.enc_dim), axis=src_time)
            loop.state.ctx = ll.dot(att, enc, reduce=src_time)
            logits = self.readout(ll.concat(h, loop.state.ctx, axis=[self.dec_dim, self.enc_dim]))
            label = ll.choice(ll.log_softmax(logits, axis=self.vocab), target=target, beam_size=self.beam,
                              axis=self.vocab, threshold=self.threshold)
            loop.state.label = label
            loop.end(ll.eq(label, EOS), include_eos=True)
            labels = loop.stack(label)
        return labels, loop.search.scores, loop.search.lengths


def search_by_hand(m: Seq2Seq, src, src_len):
    """The same beam search in vectorized PyTorch: (labels (batch, beam, time), scores, lengths)."""
    w = dict(m.named_parameters())
    k, n_vocab = m.beam, m.vocab.size
    lstm = torch.nn.LSTM(m.src_emb_dim.size, m.enc_dim.size // 2, bidirectional=True, batch_first=True).double()
    lstm.load_state_dict({n[len("encoder."):]: p for n, p in w.items() if n.startswith("encoder.")})
    x = F.embedding(src, w["src_emb.weight"])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, src_len, batch_first=True, enforce_sorted=False)
    enc, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=src.shape[1])
    n_batch, dec = src.shape[0], m.dec_dim.size
    src_mask = (torch.arange(src.shape[1])[None, :] < src_len[:, None])[:, None, :]   # (batch, 1, src)
    h = torch.zeros(n_batch, k, dec, dtype=enc.dtype)
    c = torch.zeros_like(h)
    ctx = torch.zeros(n_batch, k, enc.shape[-1], dtype=enc.dtype)
    label = torch.zeros(n_batch, k, dtype=torch.long)
    score = torch.full((n_batch, k), float("-inf"), dtype=enc.dtype)
    score[:, 0] = 0.0
    ended = torch.zeros(n_batch, k, dtype=torch.bool)
    length = torch.zeros(n_batch, k, dtype=torch.long)
    eos_only = torch.full((n_vocab,), float("-inf"), dtype=enc.dtype)
    eos_only[0] = 0.0
    srcs, labels = [], []
    w_ih, w_hh = w["cell.weight_ih_l0"], w["cell.weight_hh_l0"]
    bias = w["cell.bias_ih_l0"] + w["cell.bias_hh_l0"]

    def pick(new, old, src_beam, ended_src):
        ix = src_beam[..., None].expand(-1, -1, new.shape[-1])
        return torch.where(ended_src[..., None], old.gather(1, ix), new.gather(1, ix))

    for _ in range(m.max_len):
        xin = torch.cat([F.embedding(label, w["emb.weight"]), ctx], -1)
        gates = xin @ w_ih.T + h @ w_hh.T + bias
        i, f, g, o = gates.chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        q = h_new @ w["query.weight"].T + w["query.bias"]                                 # (batch, beam, enc)
        e = torch.einsum("bse,bke->bks", enc, q).masked_fill(~src_mask, float("-inf"))
        ctx_new = torch.einsum("bks,bse->bke", torch.softmax(e, -1), enc)
        logp = torch.log_softmax(torch.cat([h_new, ctx_new], -1) @ w["readout.weight"].T + w["readout.bias"], -1)
        logp = torch.where(ended[..., None], eos_only, logp)
        top, idx = (score[..., None] + logp).reshape(n_batch, -1).topk(k, -1)
        src_beam, lab = idx // n_vocab, idx % n_vocab
        ended_src = ended.gather(1, src_beam)
        h, c, ctx = (pick(h_new, h, src_beam, ended_src), pick(c_new, c, src_beam, ended_src),
                     pick(ctx_new, ctx, src_beam, ended_src))
        label = torch.where(ended_src, label.gather(1, src_beam), lab)
        length = length.gather(1, src_beam) + (~ended_src).long()
        ended = ended_src | (lab == EOS) | (top == float("-inf"))
        score = top
        srcs.append(src_beam)
        labels.append(lab)
        if bool(ended.all()):
            break
    # backtrack
    cur = torch.arange(k).expand(n_batch, k)
    out = []
    for t in range(len(labels) - 1, -1, -1):
        out.append(labels[t].gather(1, cur))
        cur = srcs[t].gather(1, cur)
    return torch.stack(out[::-1], -1), score, length


# -- ESPnet's BatchBeamSearch, run in a virtual environment of its own -------------------------------------

EspnetUnavailable = PeerUnavailable


def ensure_espnet_venv() -> Path:
    """The python of the ESPnet venv, built on first use (torch of this process's version, espnet --no-deps, then
    only what its beam search imports)."""
    return ensure_venv("espnet", "LOOPLIFT_ESPNET_VENV", "espnet-venv", [["--no-deps", ESPNET], ESPNET_IMPORTS],
                       "import espnet.nets.batch_beam_search")


def compare_with_espnet(model: Seq2Seq, src, src_len, args, by_looplift, nbest) -> dict:
    """Decodes the batch with ESPnet (one utterance at a time, in a subprocess), its rounds interleaved with
    looplift's; prints the timings and how many best hypotheses agree; returns the JSON keys."""
    py = ensure_espnet_venv()
    lab, sc, ln = nbest
    with tempfile.TemporaryDirectory(prefix="looplift-espnet-") as tmp:
        payload = Path(tmp) / "payload.pt"
        torch.save({"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "src": src, "src_len": src_len,
                    "config": {"beam": args.beam, "vocab": args.vocab, "eos": EOS, "max_len": args.max_len,
                               "threads": torch.get_num_threads()}}, payload)
        with open(Path(tmp) / "stderr.txt", "w+") as err:
            proc = subprocess.Popen([str(py), "-I", str(ESPNET_SIDE), str(payload)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, text=True)

            def receive() -> dict:
                for line in proc.stdout:
                    if line.startswith("@@ "):
                        return json.loads(line[3:])
                proc.wait()
                err.seek(0)
                tail = " | ".join(err.read().strip().splitlines()[-4:])
                raise EspnetUnavailable(f"the ESPnet side exited with {proc.returncode}: {tail}")

            def by_espnet() -> float:
                proc.stdin.write("run\n")
                proc.stdin.flush()
                return receive()["time"]

            try:
                info = receive()
                times = {"espnet": [], "looplift": []}
                for _ in range(args.warmup):
                    by_espnet()
                    by_looplift()
                for _ in range(args.repeats):
                    times["espnet"].append(by_espnet())
                    start = time.perf_counter()
                    by_looplift()
                    times["looplift"].append(time.perf_counter() - start)
            finally:
                if proc.poll() is None:
                    try:
                        proc.stdin.write("quit\n")
                        proc.stdin.close()
                        proc.wait(timeout=60)
                    except (OSError, subprocess.TimeoutExpired):
                        proc.kill()
                        proc.wait()
    agree, notes, max_diff = 0, [], 0.0
    for b, theirs in enumerate(info["best"]):
        k = int(sc[b].argmax())
        ours = lab[b, k, :int(ln[b, k])].tolist()
        if ours == theirs["labels"] and abs(float(sc[b, k]) - theirs["score"]) <= 1e-4:
            agree += 1
            max_diff = max(max_diff, abs(float(sc[b, k]) - theirs["score"]))
            continue
        in_nbest = any(lab[b, j, :int(ln[b, j])].tolist() == theirs["labels"] for j in range(args.beam))
        notes.append(f"  utterance {b}: looplift length {len(ours)} score {float(sc[b, k]):.4f}; ESPnet length "
                     f"{len(theirs['labels'])} score {theirs['score']:.4f} ({theirs['n_ended']} ended hypotheses; "
                     f"{'in' if in_nbest else 'not in'} looplift's n-best)")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ESPnet {info['espnet_version']} (torch {info['torch_version']}, {info['threads']} threads) "
          f"BatchBeamSearch, one utterance at a time: median {med['espnet'] * 1e3:.1f} ms for the {args.batch} "
          f"utterances (looplift {med['looplift'] * 1e3:.1f} ms in the same interleaved rounds); "
          f"times {', '.join(f'{t * 1e3:.0f}' for t in times['espnet'])} ms")
    print(f"ESPnet's best hypothesis = looplift's best (labels, score within 1e-4) for {agree} of {args.batch} "
          f"utterances (largest score difference among those {max_diff:.1e}; lengths of ESPnet's best "
          f"{' '.join(str(len(h['labels'])) for h in info['best'])})" + (":" if notes else ""))
    for note in notes:
        print(note)
    return {"espnet_vs_looplift": round(med["espnet"] / med["looplift"], 3), "espnet_best_agree": agree}


def compare_threshold(model: Seq2Seq, inputs, src_time, tgt_time, args, labels, scores) -> dict:
    """looplift's search with ``threshold=args.threshold`` against the full beam, the same model: the time
    ratio, the final beam width, and on how many utterances the best hypothesis is the same."""
    model.threshold = args.threshold
    try:
        prog = ll.compile(model, mode="search")

        def by_threshold():
            with torch.no_grad():
                return prog(inputs, src_time=src_time, tgt_time=tgt_time)

        t_labels, t_scores, t_lengths = by_threshold()
    finally:
        model.threshold = None
    full = ll.compile(model, mode="search")

    def by_full():
        with torch.no_grad():
            return full(inputs, src_time=src_time, tgt_time=tgt_time)

    beam = next(d for d in t_scores.dims if d is not B)
    axis = next(d for d in t_labels.dims if d not in (B, beam))
    t_lab, t_sc, t_ln = t_labels.align(B, beam, axis), t_scores.align(B, beam), t_lengths.align(B, beam)
    same_best = sum(int(torch.equal(t_lab[b, 0, :int(t_ln[b, 0])], labels[b, 0, :int(t_ln[b, 0])])
                        and abs(float(t_sc[b, 0] - scores[b, 0])) < 1e-9) for b in range(args.batch))
    times = {"threshold": [], "full": []}
    for _ in range(args.warmup):
        by_threshold(), by_full()
    for _ in range(args.repeats):
        for name, fn in (("threshold", by_threshold), ("full", by_full)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    width = t_sc.shape[1]
    valid = int((t_sc > float("-inf")).sum())
    print(f"threshold {args.threshold}: median {med['threshold'] * 1e3:.1f} ms vs full beam "
          f"{med['full'] * 1e3:.1f} ms; "
          f"final beam {width} slots ({valid / args.batch:.1f} hypotheses per utterance), best hypothesis the same "
          f"on {same_best}/{args.batch}")
    return {"threshold": args.threshold, "threshold_vs_full": round(med["threshold"] / med["full"], 3),
            "threshold_final_width": width, "threshold_same_best": same_best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beam", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=40)
    parser.add_argument("--source", type=int, default=30, help="source length (padded)")
    parser.add_argument("--max-len", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak", type=float, default=1.0, help="scale of the random readout weights")
    parser.add_argument("--eos-bias", type=float, default=0.0, help="added to the readout bias of EOS")
    parser.add_argument("--no-espnet", action="store_true", help="skip the comparison with ESPnet's BatchBeamSearch")
    parser.add_argument("--threshold", type=float, default=None,
                        help="also time looplift's search keeping only hypotheses within this of the best "
                             "(prune(threshold=): the beam shrinks per step); reports threshold_vs_full")
    args = parser.parse_args()
    torch.manual_seed(0)
    src_time, tgt_time = ll.Dim("src_time"), ll.Dim("tgt_time")
    vocab, src_vocab = ll.Dim("vocab", args.vocab), ll.Dim("src_vocab", 30)
    model = Seq2Seq(src_vocab, vocab, emb=64, enc=256, dec=256, beam=args.beam, max_len=args.max_len).double()
    # a peaked readout with a bias towards EOS, so hypotheses end at various lengths as a trained model's do
    with torch.no_grad():
        model.readout.weight.mul_(args.peak)
        model.readout.bias[EOS] += args.eos_bias
    src = torch.randint(0, 30, (args.batch, args.source))
    src_len = torch.randint(args.source // 2, args.source + 1, (args.batch,))
    src_len[0] = args.source
    prog = ll.compile(model, mode="search")
    inputs = ll.Named(src, (B, src_time), {src_time: src_len}, sparse_dim=src_vocab)

    def by_looplift():
        with torch.no_grad():
            return prog(inputs, src_time=src_time, tgt_time=tgt_time)

    def by_hand():
        with torch.no_grad():
            return search_by_hand(model, src, src_len)

    labels, scores, lengths = by_looplift()
    beam = next(d for d in scores.dims if d is not B)
    axis = next(d for d in labels.dims if d not in (B, beam))
    lab, sc, ln = labels.align(B, beam, axis), scores.align(B, beam), lengths.align(B, beam)
    h_lab, h_sc, h_ln = by_hand()
    assert torch.equal(ln, h_ln), (ln, h_ln)
    for b in range(args.batch):
        for k in range(args.beam):
            n = int(ln[b, k])
            assert torch.equal(lab[b, k, :n], h_lab[b, k, :n]), (b, k)
    torch.testing.assert_close(sc, h_sc, rtol=1e-9, atol=1e-9)
    print(f"n-best identical; mean hypothesis length {float(ln.double().mean()):.1f}, "
          f"steps {lab.shape[-1]}")
    times = {"looplift": [], "handwritten": []}
    fns = {"looplift": by_looplift, "handwritten": by_hand}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median search time, batch {args.batch}, beam {args.beam}: looplift {med['looplift'] * 1e3:.1f} ms, "
          f"hand-written {med['handwritten'] * 1e3:.1f} ms")
    result = {"search_vs_handwritten": round(med["looplift"] / med["handwritten"], 3),
              "utterances_per_s": round(args.batch / med["looplift"], 1)}
    if args.threshold is not None:
        result.update(compare_threshold(model, inputs, src_time, tgt_time, args, lab, sc))
    if args.no_espnet:
        result.update(espnet_vs_looplift=None, espnet_reason="--no-espnet")
    else:
        try:
            result.update(compare_with_espnet(model, src, src_len, args, by_looplift, (lab, sc, ln)))
        except Exception as e:   # noqa: BLE001 -- ESPnet is optional: report why, keep the other results
            reason = str(e) if isinstance(e, EspnetUnavailable) else f"{type(e).__name__}: {e}"
            print(f"[espnet] not compared: {reason}", file=sys.stderr)
            result.update(espnet_vs_looplift=None, espnet_reason=reason)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
