"""Whole decoders written step by step, as users write them, trained with the optimized loop.

(a) An attention LSTM decoder (the shape of DESIGN.md §9): the LSTM step, the
    query and the attention must stay in the loop (they depend on the fed-back
    context), everything else leaves it.
(b) A step-wise Transformer decoder (two layers, self-attention over the
    history with ``cum_concat``, cross-attention to an encoder): in train mode
    nothing at all is left in the loop.

Each is checked against the reference interpreter (outputs and gradients) and
against a hand-written PyTorch computation with the same weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from loop_helpers import assert_same_named
from torch.testing import assert_close

import looplift as ll

B = ll.batch_dim
ENC_T = ll.Dim("enc_time")
TGT_T = ll.Dim("target_time")
ENC_F = ll.Dim("enc_feat", 6)
V = ll.Dim("vocab", 7)
BOS = 0
DTYPE = torch.float64

ENC_LENGTHS = torch.tensor([4, 1, 3, 2])
TGT_LENGTHS = torch.tensor([3, 0, 1, 4])
ENC_PADDED, TGT_PADDED = 5, 5


def make_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(len(ENC_LENGTHS), ENC_PADDED, ENC_F.size, generator=g, dtype=DTYPE)
    targets = torch.randint(0, V.size, (len(TGT_LENGTHS), TGT_PADDED), generator=g)
    return enc, targets


def named_inputs(enc: torch.Tensor, targets: torch.Tensor):
    return (ll.Named(enc, (B, ENC_T, ENC_F), {ENC_T: ENC_LENGTHS}),
            ll.Named(targets, (B, TGT_T), {TGT_T: TGT_LENGTHS}, sparse_dim=V))


def valid(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    return torch.arange(frames)[None, :] < lengths[:, None]


def run_program(prog, model, enc, targets, *, reference: bool):
    """(loss, per-frame CE over (B, T), log-probs over (B, T, V), grads w.r.t. enc then the parameters)."""
    enc = enc.detach().clone().requires_grad_(True)
    loss, ce, log_probs = (prog.reference if reference else prog)(*named_inputs(enc, targets))
    grads = torch.autograd.grad(loss.tensor, [enc, *model.parameters()])
    return (loss, ce, log_probs), grads


def check_against_reference(prog, model, enc, targets):
    outs, grads = run_program(prog, model, enc, targets, reference=False)
    ref_outs, ref_grads = run_program(prog, model, enc, targets, reference=True)
    for a, b in zip(outs, ref_outs):
        assert_same_named(a, b)
    names = ["enc", *(n for n, _ in model.named_parameters())]
    for name, a, b in zip(names, grads, ref_grads):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda s, name=name: f"gradient w.r.t. {name}: {s}")
    return outs, grads


def check_against_torch(outs, grads, torch_loss, torch_ce, torch_log_probs, torch_grads):
    loss, ce, log_probs = outs
    m = valid(TGT_LENGTHS, TGT_PADDED)
    assert_close(loss.tensor, torch_loss, rtol=1e-9, atol=1e-10)
    assert_close(torch.where(m, ce.align(B, TGT_T), 0.0), torch.where(m, torch_ce, 0.0), rtol=1e-9, atol=1e-10)
    assert_close(torch.where(m[..., None], log_probs.align(B, TGT_T, V), 0.0),
                 torch.where(m[..., None], torch_log_probs, 0.0), rtol=1e-9, atol=1e-10)
    for i, (a, b) in enumerate(zip(grads, torch_grads)):
        assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda s, i=i: f"gradient {i} vs plain PyTorch: {s}")


def explain_sections(prog) -> dict[str, list[str]]:
    """``prog.explain()`` of a program with one loop: section title -> items (op name first); flags."""
    text = prog.explain()
    assert text.count("loop over ") == 1, text
    out: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines()[1:]:
        if line.startswith("      kept by: "):
            continue
        if line.startswith("    "):
            out[section].append(line.strip())
        else:
            stripped = line.strip()
            if stripped == "nothing left in the loop: it is gone":
                out["gone"] = []
            elif stripped.startswith("not optimized"):
                out["not optimized"] = [stripped]
            else:
                section = stripped.split(" (")[0].split(":")[0]
                out[section] = []
    return out


def op_names(items: list[str]) -> list[str]:
    return sorted(x.split(" ")[0] for x in items)


# -- (a) attention LSTM decoder ------------------------------------------------------------------------------

EMB = ll.Dim("emb", 4)
DEC = ll.Dim("dec", 5)
ATT = ll.Dim("att", 4)


class AttentionDecoder(ll.Module):
    def __init__(self, *, keys_in_loop: bool, eos: int | None = None):
        super().__init__()
        self.keys_in_loop, self.eos = keys_in_loop, eos
        self.emb = ll.nn.Embedding(V, EMB)
        self.lstm = ll.nn.LSTM(EMB + ENC_F, DEC)
        self.query = ll.nn.Linear(DEC, ATT)
        self.key = ll.nn.Linear(ENC_F, ATT)
        self.readout = ll.nn.Linear(DEC + ENC_F, V)

    def forward(self, enc, targets):
        keys = None if self.keys_in_loop else self.key(enc)
        loop = ll.Loop(axis=TGT_T)
        loop.state.label = ll.full(BOS, sparse_dim=V)
        loop.state.dec = self.lstm.default_initial_state()
        loop.state.ctx = ll.zeros([ENC_F])
        with loop:
            target = loop.unstack(targets)
            k = self.key(enc) if self.keys_in_loop else keys
            x = ll.concat(self.emb(loop.state.label), loop.state.ctx)
            h, loop.state.dec = self.lstm(x, state=loop.state.dec)
            weights = ll.softmax(ll.dot(self.query(h), k, reduce=ATT), axis=ENC_T)
            loop.state.ctx = ll.dot(weights, enc, reduce=ENC_T)
            logits = self.readout(ll.concat(h, loop.state.ctx))
            log_probs = ll.log_softmax(logits, axis=V)
            ce = loop.stack(ll.cross_entropy(log_probs, target, axis=V, logits_are_log_probs=True))
            lp = loop.stack(log_probs)
            loop.state.label = target
            if self.eos is not None:   # as in search; in training, the reference labels' axis still gives the frames
                loop.end(target == self.eos, include_eos=True)
        return ll.sum(ce, axis=[B, TGT_T]), ce, lp


def torch_attention_decoder(model: AttentionDecoder, enc: torch.Tensor, targets: torch.Tensor):
    """The same decoder as a hand-written PyTorch loop over the padded target frames (with `model.eos`: an
    entry's states stay frozen after the step whose target is EOS, its later frames computed from them)."""
    cell = torch.nn.LSTMCell(EMB.size + ENC_F.size, DEC.size).to(DTYPE)
    lstm = model.lstm
    cell.weight_ih, cell.weight_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    cell.bias_ih, cell.bias_hh = lstm.bias_ih_l0, lstm.bias_hh_l0
    n = enc.shape[0]
    enc_mask = valid(ENC_LENGTHS, ENC_PADDED)
    keys = enc @ model.key.weight.T + model.key.bias                    # (B, enc_time, att)
    h = torch.zeros(n, DEC.size, dtype=DTYPE)
    c = torch.zeros(n, DEC.size, dtype=DTYPE)
    ctx = torch.zeros(n, ENC_F.size, dtype=DTYPE)
    label = torch.full((n,), BOS)
    alive = torch.ones(n, dtype=torch.bool)
    ces, lps = [], []
    for t in range(TGT_PADDED):
        x = torch.cat([model.emb.weight[label], ctx], -1)
        new_h, new_c = cell(x, (h, c))
        q = new_h @ model.query.weight.T + model.query.bias
        energy = torch.einsum("ba,bta->bt", q, keys).masked_fill(~enc_mask, float("-inf"))
        w = torch.softmax(energy, -1)
        new_ctx = torch.einsum("bt,btf->bf", w, torch.where(enc_mask[..., None], enc, 0.0))
        logits = torch.cat([new_h, new_ctx], -1) @ model.readout.weight.T + model.readout.bias
        lp = torch.log_softmax(logits, -1)
        ces.append(-lp.gather(-1, targets[:, t, None])[:, 0])
        lps.append(lp)
        keep = alive[:, None]
        h, c, ctx = torch.where(keep, new_h, h), torch.where(keep, new_c, c), torch.where(keep, new_ctx, ctx)
        label = torch.where(alive, targets[:, t], label)
        if model.eos is not None:
            alive = alive & (targets[:, t] != model.eos)
    ce, lp = torch.stack(ces, 1), torch.stack(lps, 1)
    loss = torch.where(valid(TGT_LENGTHS, TGT_PADDED), ce, 0.0).sum()
    return loss, ce, lp


def check_attention_decoder(model: AttentionDecoder, enc: torch.Tensor, targets: torch.Tensor) -> ll.Program:
    """The decoder compiled: optimized equals the reference and the hand-written PyTorch loop (outputs and
    gradients). Returns the program."""
    prog = ll.compile(model, mode="train")
    outs, grads = check_against_reference(prog, model, enc, targets)
    enc_t = enc.detach().clone().requires_grad_(True)
    loss, ce, lp = torch_attention_decoder(model, enc_t, targets)
    torch_grads = torch.autograd.grad(loss, [enc_t, *model.parameters()])
    check_against_torch(outs, grads, loss.detach(), ce.detach(), lp.detach(), torch_grads)
    return prog


@pytest.mark.parametrize("keys_in_loop", [False, True], ids=["keys-outside", "keys-in-loop"])
def test_attention_lstm_decoder(keys_in_loop):
    torch.manual_seed(0)
    enc, targets = make_inputs()
    prog = check_attention_decoder(AttentionDecoder(keys_in_loop=keys_in_loop).to(DTYPE), enc, targets)
    s = explain_sections(prog)
    text = prog.explain()
    assert "not optimized" not in s and "gone" not in s, text
    # exactly the recurrent core stays: the concat feeding the LSTM, its step, the query, the attention
    assert op_names(s["stayed in the loop"]) == sorted(["concat", "lstm_cell", "linear", "dot", "softmax", "dot"]), text
    query = next(x for x in s["stayed in the loop"] if x.startswith("linear"))
    assert query.startswith("linear {batch, att}"), text   # the query, not the readout
    # the label embedding: over the whole (shifted) targets, before the loop
    assert op_names(s["moved in"]) == ["embedding"], text
    assert s["states moved out"] == ["label"], text
    # the readout, log_softmax and cross entropy: after the loop, on the stacked sequences
    assert op_names(s["moved out"]) == sorted(["concat", "linear", "log_softmax", "cross_entropy"]), text
    readout = next(x for x in s["moved out"] if x.startswith("linear"))
    assert "vocab" in readout, text
    # loop-invariant, computed once: the encoder's values with their padding cleared (a part of the
    # attention's dot), and the keys where they are computed in the loop
    once = s["computed once before the loop"]
    assert [x for x in once if not x.startswith("linear")] == [
        f"clear_padding (part of dot {{batch, enc_feat}} at {__file__}:141)"], text
    keys = [x for x in once if x.startswith("linear")]
    if keys_in_loop:
        assert len(keys) == 1 and "att" in keys[0] and "enc_time" in keys[0], text
    else:
        assert keys == [], text


def test_attention_lstm_decoder_ending_on_eos():
    """The same decoder with loop.end on the EOS label (as search needs it), trained over the reference labels:
    an entry's states freeze after its EOS while its later frames are still stacked (and here summed)."""
    torch.manual_seed(0)
    enc, targets = make_inputs()
    eos = 3
    targets[0, 1] = targets[2, 0] = targets[3, 2] = eos     # entries that end before their last frame
    prog = check_attention_decoder(AttentionDecoder(keys_in_loop=False, eos=eos).to(DTYPE), enc, targets)
    s = explain_sections(prog)
    text = prog.explain()
    assert "not optimized" not in s and "gone" not in s, text
    # as without loop.end: exactly the recurrent core stays; the label state moves out (frozen after EOS), the
    # end condition and the label embedding are computed before the loop, the readout after it
    assert op_names(s["stayed in the loop"]) == sorted(["concat", "lstm_cell", "linear", "dot", "softmax", "dot"]), text
    assert s["states moved out"] == ["label"], text
    assert op_names(s["moved in"]) == sorted(["embedding", "eq"]), text
    assert op_names(s["moved out"]) == sorted(["concat", "linear", "log_softmax", "cross_entropy"]), text


# -- (b) step-wise Transformer decoder -------------------------------------------------------------------------

MODEL = ll.Dim("model", 8)
HEADS = ll.Dim("heads", 2)
KEY = ll.Dim("key", 4)
FF = ll.Dim("ff", 12)


def split_heads(x):
    return ll.split_dims(x, axis=MODEL, dims=[HEADS, KEY])


def merge_heads(x):
    return ll.merge_dims(x, [HEADS, KEY], out_dim=MODEL)


class DecoderLayer(ll.Module):
    """Pre-norm: self-attention over the history, cross-attention to the encoder, feed-forward."""

    def __init__(self):
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_ff = ll.nn.LayerNorm(MODEL), ll.nn.LayerNorm(MODEL), ll.nn.LayerNorm(MODEL)
        self.q, self.k, self.v, self.o = (ll.nn.Linear(MODEL, MODEL) for _ in range(4))
        self.cq, self.co = ll.nn.Linear(MODEL, MODEL), ll.nn.Linear(MODEL, MODEL)
        self.ck, self.cv = ll.nn.Linear(ENC_F, MODEL), ll.nn.Linear(ENC_F, MODEL)
        self.ff = ll.nn.FeedForward(MODEL, FF)

    def step(self, x, enc):
        """One decoder position `x` (over {batch, model}), attending to its history and to `enc`."""
        scale = 1 / math.sqrt(KEY.size)
        y = self.ln_self(x)
        keys = ll.cum_concat(split_heads(self.k(y)))
        values = ll.cum_concat(split_heads(self.v(y)))
        w = ll.softmax(ll.dot(split_heads(self.q(y)), keys, reduce=KEY) * scale, axis=TGT_T.history())
        x = x + self.o(merge_heads(ll.dot(w, values, reduce=TGT_T.history())))
        y = self.ln_cross(x)
        w = ll.softmax(ll.dot(split_heads(self.cq(y)), split_heads(self.ck(enc)), reduce=KEY) * scale, axis=ENC_T)
        x = x + self.co(merge_heads(ll.dot(w, split_heads(self.cv(enc)), reduce=ENC_T)))
        return x + self.ff(self.ln_ff(x))


class TransformerDecoder(ll.Module):
    def __init__(self):
        super().__init__()
        self.emb = ll.nn.Embedding(V, MODEL)
        self.freq = ll.Parameter((MODEL,), init=lambda t: t.copy_(torch.linspace(0.1, 1.5, MODEL.size)))
        self.layer1, self.layer2 = DecoderLayer(), DecoderLayer()
        self.ln_out = ll.nn.LayerNorm(MODEL)
        self.readout = ll.nn.Linear(MODEL, V)

    def forward(self, enc, targets):
        loop = ll.Loop(axis=TGT_T)
        loop.state.label = ll.full(BOS, sparse_dim=V)
        with loop:
            target = loop.unstack(targets)
            position = ll.sin(ll.cast(loop.index, DTYPE) * self.freq)
            x = self.emb(loop.state.label) + position
            x = self.layer2.step(self.layer1.step(x, enc), enc)
            log_probs = ll.log_softmax(self.readout(self.ln_out(x)), axis=V)
            ce = loop.stack(ll.cross_entropy(log_probs, target, axis=V, logits_are_log_probs=True))
            lp = loop.stack(log_probs)
            loop.state.label = target
        return ll.sum(ce, axis=[B, TGT_T]), ce, lp


def _torch_linear(m, x):
    return x @ m.weight.T + m.bias


def _torch_ln(m, x):
    return torch.nn.functional.layer_norm(x, (MODEL.size,), m.weight, m.bias, m.eps)


def _torch_attention(q, k, v, mask):
    """q (B, Tq, model), k/v (B, Tk, model), mask (B or 1, Tq, Tk): True where attending is allowed."""
    def heads(x):
        return x.view(*x.shape[:2], HEADS.size, KEY.size).transpose(1, 2)     # (B, heads, T, key)
    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(KEY.size)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.softmax(scores, -1) @ heads(v)                                 # (B, heads, Tq, key)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], MODEL.size)


def torch_transformer_decoder(model: TransformerDecoder, enc: torch.Tensor, targets: torch.Tensor):
    """The same decoder over whole padded sequences with causal masks (teacher forcing)."""
    n = enc.shape[0]
    prev = torch.cat([torch.full((n, 1), BOS), targets[:, :-1]], 1)            # the previous labels
    steps = torch.arange(TGT_PADDED, dtype=DTYPE)
    x = model.emb.weight[prev] + torch.sin(steps[:, None] * model.freq)
    causal = torch.tril(torch.ones(TGT_PADDED, TGT_PADDED, dtype=torch.bool))[None]
    enc_mask = valid(ENC_LENGTHS, ENC_PADDED)[:, None, :].expand(n, TGT_PADDED, ENC_PADDED)
    enc = torch.where(valid(ENC_LENGTHS, ENC_PADDED)[..., None], enc, 0.0)
    for layer in (model.layer1, model.layer2):
        y = _torch_ln(layer.ln_self, x)
        x = x + _torch_linear(layer.o, _torch_attention(_torch_linear(layer.q, y), _torch_linear(layer.k, y),
                                                        _torch_linear(layer.v, y), causal))
        y = _torch_ln(layer.ln_cross, x)
        x = x + _torch_linear(layer.co, _torch_attention(_torch_linear(layer.cq, y), _torch_linear(layer.ck, enc),
                                                         _torch_linear(layer.cv, enc), enc_mask))
        y = _torch_ln(layer.ln_ff, x)
        x = x + _torch_linear(layer.ff.down, torch.relu(_torch_linear(layer.ff.up, y)))
    lp = torch.log_softmax(_torch_linear(model.readout, _torch_ln(model.ln_out, x)), -1)
    ce = -lp.gather(-1, targets[..., None])[..., 0]
    loss = torch.where(valid(TGT_LENGTHS, TGT_PADDED), ce, 0.0).sum()
    return loss, ce, lp


def test_transformer_decoder_step_wise():
    torch.manual_seed(0)
    model = TransformerDecoder().to(DTYPE)
    prog = ll.compile(model, mode="train")
    enc, targets = make_inputs()
    outs, grads = check_against_reference(prog, model, enc, targets)

    enc_t = enc.detach().clone().requires_grad_(True)
    loss, ce, lp = torch_transformer_decoder(model, enc_t, targets)
    torch_grads = torch.autograd.grad(loss, [enc_t, *model.parameters()])
    check_against_torch(outs, grads, loss.detach(), ce.detach(), lp.detach(), torch_grads)

    s = explain_sections(prog)
    text = prog.explain()
    assert "not optimized" not in s, text
    assert "gone" in s and "stayed in the loop" not in s, text
    forms = s["replaced by sequence forms"]
    assert sum(f.startswith("cum_concat as the whole sequence with a causal history dim") for f in forms) == 4, text
    assert any(f.startswith(f"step index as range_over_dim({TGT_T.name})") for f in forms), text
    assert s["states moved out"] == ["label"], text
