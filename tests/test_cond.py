"""``looplift.Cond``: one branch runs, chosen by a scalar predicate, in and outside loops.

Every program here is called with inputs that take each branch, on one trace
(the predicate is data, not a Python constant), and its values are checked
against plain PyTorch, with the optimized executor and with the reference
interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import looplift as ll

B = ll.batch_dim
T = ll.Dim("time")
F = ll.Dim("feat", 3)
H = ll.Dim("hidden", 2)


def flag(value: bool) -> ll.Named:
    """A bool scalar program input."""
    return ll.Named(torch.tensor(value), ())


def run_both(program: ll.Program, *args):
    """The program's outputs (optimized run) after checking that the reference interpreter gives the same."""
    out = program(*args)
    ref = program.reference(*args)
    out_leaves = out if isinstance(out, (tuple, list)) else [out]
    ref_leaves = ref if isinstance(ref, (tuple, list)) else [ref]
    for a, b in zip(out_leaves, ref_leaves, strict=True):
        assert set(a.dims) == set(b.dims)
        torch.testing.assert_close(a.align(*a.dims), b.align(*a.dims))
    return out


def features(seed: int = 0, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, F.size, dtype=torch.float64)


# -- outside a loop ---------------------------------------------------------------------------

def test_one_program_takes_either_branch_by_its_input():
    def model(x, threshold):
        with ll.Cond(ll.sum(x, axis=[B, F]) > threshold) as cond:
            cond.true = ll.tanh(x) * 2.0
            cond.false = ll.exp(x) - 1.0
        return cond.result

    program = ll.compile(model)
    x = features()
    for threshold, expected in ((x.sum() - 1, torch.tanh(x) * 2), (x.sum() + 1, torch.exp(x) - 1)):
        out = run_both(program, ll.Named(x, (B, F)), ll.Named(threshold, ()))
        assert set(out.dims) == {B, F}
        torch.testing.assert_close(out.align(B, F), expected)
    assert len(program.traces) == 1


def test_the_predicate_may_come_from_the_lengths():
    def model(x, limit):
        with ll.Cond(ll.max(ll.length(T), axis=B) > limit) as cond:
            cond.true = ll.sum(x, axis=T)
            cond.false = ll.mean(x, axis=T)
        return cond.result

    program = ll.compile(model)
    torch.manual_seed(1)
    x, lengths = torch.randn(2, 5, F.size, dtype=torch.float64), torch.tensor([5, 3])
    summed = torch.stack([x[0, :5].sum(0), x[1, :3].sum(0)])
    mean = summed / lengths[:, None]
    for limit, expected in ((4, summed), (5, mean)):
        out = run_both(program, ll.Named(x, (B, T, F), {T: lengths}), ll.Named(torch.tensor(limit), ()))
        torch.testing.assert_close(out.align(B, F), expected)
    assert len(program.traces) == 1


@dataclass
class Pair:
    first: object
    second: object


def test_branches_return_nested_structures():
    def model(x, pred):
        with ll.Cond(pred) as cond:
            cond.true = (x + 1.0, {"sum": ll.sum(x, axis=F), "pair": Pair(x * 2.0, ll.max(x, axis=B))})
            cond.false = (x - 1.0, {"sum": ll.sum(x * x, axis=F), "pair": Pair(-x, ll.min(x, axis=B))})
        return cond.result

    x = features()
    program = ll.compile(model)
    for taken in (True, False):
        a, d = program(ll.Named(x, (B, F)), flag(taken))
        ref_a, ref_d = program.reference(ll.Named(x, (B, F)), flag(taken))
        assert isinstance(d, dict) and list(d) == ["sum", "pair"] and isinstance(d["pair"], Pair)
        expected = ((x + 1, x.sum(1), x * 2, x.amax(0)) if taken else (x - 1, (x * x).sum(1), -x, x.amin(0)))
        got = (a.align(B, F), d["sum"].align(B), d["pair"].first.align(B, F), d["pair"].second.align(F))
        ref = (ref_a.align(B, F), ref_d["sum"].align(B), ref_d["pair"].first.align(B, F),
               ref_d["pair"].second.align(F))
        for g, r, e in zip(got, ref, expected):
            torch.testing.assert_close(g, e)
            torch.testing.assert_close(r, e)


def test_branches_may_return_python_numbers():
    def model(x, pred):
        with ll.Cond(pred) as cond:
            cond.true = (x, 1.5)
            cond.false = (x * 0.0, 2.5)
        y, scale = cond.result
        return y * scale

    program = ll.compile(model)
    x = features()
    torch.testing.assert_close(run_both(program, ll.Named(x, (B, F)), flag(True)).align(B, F), x * 1.5)
    torch.testing.assert_close(run_both(program, ll.Named(x, (B, F)), flag(False)).align(B, F), x * 0.0)


def test_a_branch_may_return_an_outer_value_unchanged():
    def model(x, y, pred):
        with ll.Cond(pred) as cond:
            cond.true = x
            cond.false = y * 3.0
        return cond.result

    program = ll.compile(model)
    x, y = features(0), features(1)
    args = (ll.Named(x, (B, F)), ll.Named(y.T, (F, B)))  # another storage order than x
    torch.testing.assert_close(run_both(program, *args, flag(True)).align(B, F), x)
    torch.testing.assert_close(run_both(program, *args, flag(False)).align(B, F), y * 3)


def test_both_branches_may_return_outer_values_unchanged():
    def model(x, y, pred):
        with ll.Cond(pred) as cond:
            cond.true = x
            cond.false = y
        return cond.result

    program = ll.compile(model)
    x, y = features(0), features(1)
    args = (ll.Named(x, (B, F)), ll.Named(y, (B, F)))
    torch.testing.assert_close(run_both(program, *args, flag(True)).align(B, F), x)
    torch.testing.assert_close(run_both(program, *args, flag(False)).align(B, F), y)


# -- gradients --------------------------------------------------------------------------------

class TwoWays(ll.Module):
    def __init__(self):
        super().__init__()
        self.a = ll.nn.Linear(F, H)
        self.b = ll.nn.Linear(F, H)

    def forward(self, x, pred):
        with ll.Cond(pred) as cond:
            cond.true = ll.tanh(self.a(x))
            cond.false = self.b(x) * x_sum(x)
        return cond.result


def x_sum(x):
    return ll.sum(x, axis=F)


@pytest.mark.parametrize("taken", [True, False])
def test_gradients_flow_through_the_taken_branch_only(taken):
    torch.manual_seed(2)
    model = TwoWays().double()
    lin_a, lin_b = torch.nn.Linear(F.size, H.size).double(), torch.nn.Linear(F.size, H.size).double()
    lin_a.load_state_dict(model.a.state_dict())
    lin_b.load_state_dict(model.b.state_dict())
    x = features().requires_grad_()
    w = torch.randn(x.shape[0], H.size, dtype=torch.float64)

    out = ll.compile(model)(ll.Named(x, (B, F)), flag(taken))
    (out.align(B, H) * w).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    ref = torch.tanh(lin_a(x_ref)) if taken else lin_b(x_ref) * x_ref.sum(1, keepdim=True)
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    used, unused, ref_used = (model.a, model.b, lin_a) if taken else (model.b, model.a, lin_b)
    for name, p in used.named_parameters():
        torch.testing.assert_close(p.grad, getattr(ref_used, name).grad, msg=name)
    for name, p in unused.named_parameters():
        assert p.grad is None or not p.grad.any(), name


def test_gradients_flow_through_an_outer_value_returned_unchanged():
    def model(x, pred):
        with ll.Cond(pred) as cond:
            cond.true = x
            cond.false = x * x
        return cond.result

    program = ll.compile(model)
    for taken in (True, False):
        x = features().requires_grad_()
        program(ll.Named(x, (B, F)), flag(taken)).align(B, F).sum().backward()
        torch.testing.assert_close(x.grad, torch.ones_like(x) if taken else 2 * x.detach())


# -- inside a loop ----------------------------------------------------------------------------

def test_cond_in_a_loop_takes_both_branches_by_the_step():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.s = ll.zeros([F])
        with loop:
            x_t = loop.unstack(x)
            with ll.Cond(ll.mod(loop.index, 3) == 1) as cond:
                cond.true = (loop.state.s * 0.5, ll.full(1.0))
                cond.false = (loop.state.s + x_t, ll.full(0.0))
            loop.state.s, took_true = cond.result
            ys = loop.stack(loop.state.s)
            flags = loop.stack(took_true)
        return ys, flags, loop.state.s

    torch.manual_seed(3)
    x, lengths = torch.randn(2, 5, F.size, dtype=torch.float64), torch.tensor([5, 3])
    ys, flags, final = run_both(ll.compile(model), ll.Named(x, (B, T, F), {T: lengths}))
    assert set(flags.dims) == {T}
    assert flags.align(T).tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]
    for b, n in enumerate(lengths.tolist()):
        s, expected = torch.zeros(F.size, dtype=torch.float64), []
        for t in range(n):
            s = s * 0.5 if t % 3 == 1 else s + x[b, t]
            expected.append(s)
        torch.testing.assert_close(ys.align(B, T, F)[b, :n], torch.stack(expected))
        torch.testing.assert_close(final.align(B, F)[b], s)


def test_cond_in_a_loop_with_a_module_in_one_branch_gets_its_gradients():
    torch.manual_seed(4)
    lin = ll.nn.Linear(F + H, H).double()
    ref_lin = torch.nn.Linear(F.size + H.size, H.size).double()
    ref_lin.load_state_dict(lin.state_dict())

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.s = ll.zeros([H])
        with loop:
            x_t = loop.unstack(x)
            with ll.Cond(ll.mod(loop.index, 2) == 0) as cond:
                cond.true = ll.tanh(lin(ll.concat(x_t, loop.state.s)))
                cond.false = loop.state.s - ll.sum(x_t, axis=F)
            loop.state.s = cond.result
        return loop.state.s

    x, lengths = torch.randn(2, 4, F.size, dtype=torch.float64, requires_grad=True), torch.tensor([4, 3])
    final = run_both(ll.compile(model), ll.Named(x, (B, T, F), {T: lengths}))
    final.align(B, H).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    total = 0.0
    for b, n in enumerate(lengths.tolist()):
        s = torch.zeros(H.size, dtype=torch.float64)
        for t in range(n):
            s = torch.tanh(ref_lin(torch.cat([x_ref[b, t], s]))) if t % 2 == 0 else s - x_ref[b, t].sum()
        total = total + s.sum()
    total.backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(lin.weight.grad, ref_lin.weight.grad)
    torch.testing.assert_close(lin.bias.grad, ref_lin.bias.grad)


def test_a_branch_in_a_loop_may_return_the_state_or_an_input_unchanged():
    def model(x, y):
        loop = ll.Loop(axis=T)
        loop.state.s = ll.zeros([B, F])
        with loop:
            x_t = loop.unstack(x)
            with ll.Cond(ll.mod(loop.index, 2) == 0) as cond:
                cond.true = loop.state.s
                cond.false = y
            loop.state.s = cond.result + x_t
        return loop.state.s

    torch.manual_seed(5)
    x, y, lengths = torch.randn(2, 4, F.size), torch.randn(2, F.size), torch.tensor([4, 3])
    final = run_both(ll.compile(model), ll.Named(x, (B, T, F), {T: lengths}), ll.Named(y, (B, F)))
    for b, n in enumerate(lengths.tolist()):
        s = torch.zeros(F.size)
        for t in range(n):
            s = (s if t % 2 == 0 else y[b]) + x[b, t]
        torch.testing.assert_close(final.align(B, F)[b], s)


def test_the_step_index_may_be_read_inside_a_branch():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.s = ll.zeros([B, F])
        with loop:
            x_t = loop.unstack(x)
            with ll.Cond(loop.index > 1) as cond:
                cond.true = loop.state.s + x_t * ll.cast(loop.index, "float64")
                cond.false = loop.state.s
            loop.state.s = cond.result
        return loop.state.s

    torch.manual_seed(6)
    x, lengths = torch.randn(2, 5, F.size, dtype=torch.float64), torch.tensor([5, 3])
    final = run_both(ll.compile(model), ll.Named(x, (B, T, F), {T: lengths}))
    for b, n in enumerate(lengths.tolist()):
        expected = sum((x[b, t] * t for t in range(2, n)), torch.zeros(F.size, dtype=torch.float64))
        torch.testing.assert_close(final.align(B, F)[b], expected)


# -- nesting ------------------------------------------------------------------------------------

def test_conds_nest():
    def model(x, outer, inner):
        with ll.Cond(outer) as c1:
            with ll.Cond(inner) as c2:
                c2.true = x * 2.0
                c2.false = x * 3.0
            c1.true = c2.result + 1.0
            c1.false = x
        return c1.result

    program = ll.compile(model)
    x = features()
    for outer in (True, False):
        for inner in (True, False):
            out = run_both(program, ll.Named(x, (B, F)), flag(outer), flag(inner))
            expected = (x * (2 if inner else 3) + 1) if outer else x
            torch.testing.assert_close(out.align(B, F), expected)
    assert len(program.traces) == 1


def test_a_loop_inside_a_branch_runs_only_when_taken():
    def model(x, pred):
        with ll.Cond(pred) as cond:
            loop = ll.Loop(axis=T)
            loop.state.s = ll.zeros([B, F])
            with loop:
                loop.state.s = loop.state.s + loop.unstack(x)
            cond.true = loop.state.s
            cond.false = ll.max(x, axis=T)
        return cond.result

    torch.manual_seed(7)
    x, lengths = torch.randn(2, 5, F.size, dtype=torch.float64), torch.tensor([5, 3])
    program = ll.compile(model)
    summed = run_both(program, ll.Named(x, (B, T, F), {T: lengths}), flag(True))
    maxed = run_both(program, ll.Named(x, (B, T, F), {T: lengths}), flag(False))
    torch.testing.assert_close(summed.align(B, F), torch.stack([x[0, :5].sum(0), x[1, :3].sum(0)]))
    torch.testing.assert_close(maxed.align(B, F), torch.stack([x[0, :5].amax(0), x[1, :3].amax(0)]))
