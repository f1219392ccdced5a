"""Modules and parameters: names, sharing, dims, and each ``looplift.nn`` module against ``torch.nn``.

Every module is checked against the PyTorch module with the same weights
copied over; training with a looplift program must give exactly the parameters
that the hand-written PyTorch model gives.
"""

import pytest
import torch

import looplift as ll
from looplift.errors import TraceError

B = ll.batch_dim


def lengths_mask(lens: torch.Tensor, t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < lens[:, None]


def masked_mean_torch(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over valid frames of a (batch, time, feat) tensor, with the ops of ``looplift.mean``."""
    m = mask[:, :, None]
    total = y.masked_fill(~m, 0).sum(dim=(0, 1, 2))
    count = m.expand(y.shape).sum(dim=(0, 1, 2)).to(y.dtype)
    return total / count


def copy_linear(src: ll.nn.Linear, dst: torch.nn.Linear) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)


# -- names --------------------------------------------------------------------------------

class Block(ll.Module):
    def __init__(self, feat: ll.Dim, hidden: ll.Dim):
        super().__init__()
        self.norm = ll.nn.LayerNorm(feat)
        self.ff = ll.nn.FeedForward(feat, hidden)

    def forward(self, x):
        return x + self.ff(self.norm(x))


class Stack(ll.Module):
    def __init__(self, feat: ll.Dim, hidden: ll.Dim, n: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(feat, hidden) for _ in range(n)])
        self.out = ll.nn.Linear(feat, feat)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_nested_parameter_names_are_the_attribute_chain():
    feat, hidden = ll.Dim("feat", 4), ll.Dim("hidden", 6)
    model = Stack(feat, hidden, 2)
    names = [name for name, _ in model.named_parameters()]
    expected = []
    for i in range(2):
        expected += [f"blocks.{i}.norm.weight", f"blocks.{i}.norm.bias",
                     f"blocks.{i}.ff.up.weight", f"blocks.{i}.ff.up.bias",
                     f"blocks.{i}.ff.down.weight", f"blocks.{i}.ff.down.bias"]
    expected += ["out.weight", "out.bias"]
    assert names == expected
    assert list(model.state_dict()) == expected


def test_names_come_from_the_root_that_is_compiled():
    feat, hidden = ll.Dim("feat", 4), ll.Dim("hidden", 6)
    model = Stack(feat, hidden, 1)
    assert [n for n, _ in model.blocks[0].named_parameters()] == [
        "norm.weight", "norm.bias", "ff.up.weight", "ff.up.bias", "ff.down.weight", "ff.down.bias"]


class SharedTwice(ll.Module):
    def __init__(self, feat: ll.Dim, out: ll.Dim):
        super().__init__()
        self.first = ll.nn.Linear(feat, out)
        self.other = ll.nn.Linear(feat, out)
        self.second = self.first  # the same module under a second attribute

    def forward(self, x):
        return self.second(ll.tanh(x)) + self.first(x) + self.other(x)


def test_shared_module_has_one_name_the_first_path():
    model = SharedTwice(ll.Dim("feat", 3), ll.Dim("out", 2))
    assert [n for n, _ in model.named_parameters()] == ["first.weight", "first.bias", "other.weight", "other.bias"]
    assert len(list(model.parameters())) == 4


def test_shared_module_is_one_set_of_parameter_nodes_in_the_graph():
    feat = ll.Dim("feat", 3)
    model = SharedTwice(feat, ll.Dim("out", 2))
    trace = ll.compile(model).trace(ll.Spec((B, feat)))
    params = [n for n in trace.graph.nodes if n.op == "param"]
    assert len(params) == 4
    assert {id(n.attrs["module"]) for n in params} == {id(model.first), id(model.other)}


class TiedOutput(ll.Module):
    """An embedding whose table is also the output projection (weight tying)."""

    def __init__(self, vocab: ll.Dim, model_dim: ll.Dim):
        super().__init__()
        self.emb = ll.nn.Embedding(vocab, model_dim)
        self.readout = ll.nn.Linear(model_dim, vocab, with_bias=False)
        self.readout.weight = self.emb.weight

    def forward(self, labels):
        return self.readout(ll.tanh(self.emb(labels)))


def test_tied_parameter_has_one_name_and_gets_both_gradients():
    vocab, model_dim = ll.Dim("vocab", 5), ll.Dim("model", 3)
    model = TiedOutput(vocab, model_dim)
    assert [n for n, _ in model.named_parameters()] == ["emb.weight"]
    labels = torch.tensor([[0, 4, 2], [1, 1, 3]])
    out = ll.compile(model)(ll.Named(labels, (B, ll.Dim("len", 3)), sparse_dim=vocab))
    out.tensor.square().sum().backward()

    w = model.emb.weight.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(torch.tanh(torch.nn.functional.embedding(labels, w)), w)
    ref.square().sum().backward()
    torch.testing.assert_close(out.tensor, ref)
    torch.testing.assert_close(model.emb.weight.grad, w.grad)


# -- repeated calls -------------------------------------------------------------------------

class CalledTwice(ll.Module):
    """``lin(tanh(lin(x)))``: one Linear applied to its own output (renamed back to the in dim)."""

    def __init__(self, feat: ll.Dim):
        super().__init__()
        self.lin = ll.nn.Linear(feat, ll.Dim("out", feat.size))

    def forward(self, x):
        h = ll.replace_dim(ll.tanh(self.lin(x)), self.lin.out_dim, self.lin.in_dim)
        return self.lin(h)


def test_module_called_twice_shares_its_parameters():
    feat = ll.Dim("feat", 4)
    model = CalledTwice(feat)
    trace = ll.compile(model).trace(ll.Spec((B, feat)))
    assert [n.attrs["name"] for n in trace.graph.nodes if n.op == "param"] == ["weight", "bias"]
    assert [n.op for n in trace.graph.nodes].count("linear") == 2
    assert len(list(model.parameters())) == 2


def test_gradient_accumulates_from_both_calls():
    torch.manual_seed(0)
    feat = ll.Dim("feat", 4)
    model = CalledTwice(feat)
    ref = torch.nn.Linear(4, 4)
    copy_linear(model.lin, ref)
    x = torch.randn(3, 4)

    out = ll.compile(model)(ll.Named(x, (B, feat)))
    out.tensor.sin().sum().backward()
    ref(torch.tanh(ref(x))).sin().sum().backward()

    torch.testing.assert_close(model.lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(model.lin.bias.grad, ref.bias.grad)
    # Both calls contribute: the gradient through the first call alone differs.
    only_outer = torch.func.grad(lambda w: torch.nn.functional.linear(
        torch.tanh(ref(x)).detach(), w, ref.bias).sin().sum())(ref.weight.detach())
    assert not torch.allclose(model.lin.weight.grad, only_outer)


# -- parameter dims -------------------------------------------------------------------------

def test_parameters_have_their_dims():
    a, b, v = ll.Dim("a", 3), ll.Dim("b", 5), ll.Dim("vocab", 7)
    lin = ll.nn.Linear(a, b)
    assert lin.param_dims("weight") == (b, a) and lin.param_dims("bias") == (b,)
    assert lin.weight.shape == (5, 3) and lin.bias.shape == (5,)
    emb = ll.nn.Embedding(v, a)
    assert emb.param_dims("weight") == (v, a) and emb.weight.shape == (7, 3)
    norm = ll.nn.LayerNorm(a)
    assert norm.param_dims("weight") == (a,) and norm.param_dims("bias") == (a,)
    conv = ll.nn.Conv1d(a, b, 3)
    assert conv.param_dims("weight") == (b, a, conv.filter_dim) and conv.filter_dim.size == 3
    assert conv.weight.shape == (5, 3, 3)


def test_parameter_created_from_dims_and_init():
    a, b = ll.Dim("a", 2), ll.Dim("b", 3)

    class Custom(ll.Module):
        def __init__(self):
            super().__init__()
            self.scale = ll.Parameter((a, b), init=0.5)

        def forward(self, x):
            return x * self.scale

    model = Custom()
    assert model.param_dims("scale") == (a, b)
    assert torch.equal(model.scale, torch.full((2, 3), 0.5))
    assert isinstance(model.scale, torch.nn.Parameter)
    x = torch.randn(4, 3)
    out = ll.compile(model)(ll.Named(x, (B, b)))
    torch.testing.assert_close(out.align(B, a, b), (x[:, None, :] * 0.5).expand(4, 2, 3))


def test_parameter_without_dims_is_a_trace_error():
    feat = ll.Dim("feat", 2)

    class Plain(ll.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

    with pytest.raises(TraceError, match="Plain.w has no dims"):
        ll.compile(Plain()).trace(ll.Spec((B, feat)))


def test_parameters_are_torch_parameters_outside_tracing():
    lin = ll.nn.Linear(ll.Dim("a", 2), ll.Dim("b", 2))
    assert isinstance(lin.weight, torch.nn.Parameter)


# -- each nn module against torch.nn -----------------------------------------------------------

def test_linear_equals_torch_linear_in_any_storage_order():
    torch.manual_seed(0)
    t, fin, fout = ll.Dim("time"), ll.Dim("in", 5), ll.Dim("out", 3)
    model = ll.nn.Linear(fin, fout)
    ref = torch.nn.Linear(5, 3)
    copy_linear(model, ref)
    x = torch.randn(2, 4, 5)
    lens = torch.tensor([4, 2])
    prog = ll.compile(model)
    out = prog(ll.Named(x, (B, t, fin), lengths={t: lens}))
    torch.testing.assert_close(out.align(B, t, fout), ref(x))
    out = prog(ll.Named(x.permute(2, 0, 1), (fin, B, t), lengths={t: lens}))
    torch.testing.assert_close(out.align(B, t, fout), ref(x))


def test_linear_without_bias_equals_torch():
    torch.manual_seed(0)
    fin, fout = ll.Dim("in", 5), ll.Dim("out", 3)
    model = ll.nn.Linear(fin, fout, with_bias=False)
    assert [n for n, _ in model.named_parameters()] == ["weight"]
    x = torch.randn(2, 5)
    out = ll.compile(model)(ll.Named(x, (B, fin)))
    torch.testing.assert_close(out.align(B, fout), x @ model.weight.detach().T)


def test_embedding_equals_torch_embedding():
    torch.manual_seed(0)
    t, vocab, dim = ll.Dim("time"), ll.Dim("vocab", 11), ll.Dim("model", 6)
    model = ll.nn.Embedding(vocab, dim)
    ref = torch.nn.Embedding(11, 6)
    with torch.no_grad():
        ref.weight.copy_(model.weight)
    labels = torch.randint(0, 11, (3, 5))
    lens = torch.tensor([5, 1, 3])
    out = ll.compile(model)(ll.Named(labels, (B, t), lengths={t: lens}, sparse_dim=vocab))
    assert out.tensor.dtype == torch.float32
    torch.testing.assert_close(out.align(B, t, dim), ref(labels))


def test_layer_norm_equals_torch_layer_norm():
    torch.manual_seed(0)
    t, feat = ll.Dim("time"), ll.Dim("feat", 8)
    model = ll.nn.LayerNorm(feat, eps=1e-3)
    ref = torch.nn.LayerNorm(8, eps=1e-3)
    with torch.no_grad():
        model.weight.uniform_(0.5, 1.5)
        model.bias.uniform_(-1, 1)
        ref.weight.copy_(model.weight)
        ref.bias.copy_(model.bias)
    x = torch.randn(3, 4, 8) * 3 + 1
    out = ll.compile(model)(ll.Named(x, (B, t, feat), lengths={t: torch.tensor([4, 4, 2])}))
    torch.testing.assert_close(out.align(B, t, feat), ref(x))
    # Stored with the feature dim first, normalized over the same dim.
    out = ll.compile(model)(ll.Named(x.permute(2, 0, 1), (feat, B, t), lengths={t: torch.tensor([4, 4, 2])}))
    torch.testing.assert_close(out.align(B, t, feat), ref(x))


def _torch_conv_alone(ref: torch.nn.Conv1d, x: torch.Tensor, n: int, stride: int, padding: str) -> torch.Tensor:
    """The torch conv of one sequence (time, in) cut to its length `n`, as (time', out)."""
    k, dil = ref.kernel_size[0], ref.dilation[0]
    span = (k - 1) * dil
    seq = x[:n].T[None]
    if padding == "same":
        seq = torch.nn.functional.pad(seq, (span // 2, span - span // 2))
    return torch.nn.functional.conv1d(seq, ref.weight, ref.bias, stride=stride, dilation=dil)[0].T


@pytest.mark.parametrize("k,stride,dilation,padding", [(3, 1, 1, "same"), (4, 1, 1, "same"), (3, 2, 1, "same"),
                                                        (3, 1, 2, "same"), (3, 1, 1, "valid")])
def test_conv1d_equals_torch_conv1d_per_sequence(k, stride, dilation, padding):
    torch.manual_seed(0)
    t, fin, fout = ll.Dim("time"), ll.Dim("in", 3), ll.Dim("out", 5)
    model = ll.nn.Conv1d(fin, fout, k, stride=stride, dilation=dilation, padding=padding)
    ref = torch.nn.Conv1d(3, 5, k, stride=stride, dilation=dilation)
    with torch.no_grad():
        ref.weight.copy_(model.weight)
        ref.bias.copy_(model.bias)
    x = torch.randn(3, 9, 3)
    lens = torch.tensor([9, 6, 7])
    x_padded = x.clone()
    x_padded[1, 6:] = 1e3  # padding values must not leak into valid frames
    x_padded[2, 7:] = float("nan")
    out = ll.compile(model)(ll.Named(x_padded, (B, t, fin), lengths={t: lens}), axis=t)
    out_t = next(d for d in out.dims if d not in (B, fout))
    y = out.align(B, out_t, fout)
    for i, n in enumerate(lens.tolist()):
        expect = _torch_conv_alone(ref, x[i], n, stride, padding)
        assert int(out.lengths[out_t][i]) == expect.shape[0]
        torch.testing.assert_close(y[i, :expect.shape[0]], expect)


def test_conv1d_same_padding_equals_torch_padding_same():
    torch.manual_seed(0)
    t, fin, fout = ll.Dim("time"), ll.Dim("in", 3), ll.Dim("out", 4)
    model = ll.nn.Conv1d(fin, fout, 5)
    ref = torch.nn.Conv1d(3, 4, 5, padding="same")
    with torch.no_grad():
        ref.weight.copy_(model.weight)
        ref.bias.copy_(model.bias)
    x = torch.randn(2, 3, 7)  # stored as torch wants it: (batch, in, time)
    out = ll.compile(model)(ll.Named(x, (B, fin, t), lengths={t: torch.tensor([7, 7])}), axis=t)
    torch.testing.assert_close(out.align(B, fout, t), ref(x))


def test_feed_forward_equals_torch_sequential():
    torch.manual_seed(0)
    t, feat, hidden = ll.Dim("time"), ll.Dim("feat", 4), ll.Dim("hidden", 8)
    model = ll.nn.FeedForward(feat, hidden)
    up, down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
    copy_linear(model.up, up)
    copy_linear(model.down, down)
    ref = torch.nn.Sequential(up, torch.nn.ReLU(), down)
    x = torch.randn(2, 5, 4)
    out = ll.compile(model)(ll.Named(x, (B, t, feat), lengths={t: torch.tensor([5, 3])}))
    torch.testing.assert_close(out.align(B, t, feat), ref(x))


def test_feed_forward_with_activation_equals_torch():
    torch.manual_seed(0)
    feat, hidden = ll.Dim("feat", 4), ll.Dim("hidden", 8)
    model = ll.nn.FeedForward(feat, hidden, activation=ll.gelu)
    up, down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
    copy_linear(model.up, up)
    copy_linear(model.down, down)
    x = torch.randn(3, 4)
    out = ll.compile(model, mode="eval")(ll.Named(x, (B, feat)))
    torch.testing.assert_close(out.align(B, feat), down(torch.nn.functional.gelu(up(x))))


# -- dropout and modes ------------------------------------------------------------------------

def test_dropout_is_active_in_train_mode():
    feat = ll.Dim("feat", 1000)
    model = ll.nn.Dropout(0.25)
    x = torch.rand(4, 1000) + 1.0
    torch.manual_seed(0)
    out = ll.compile(model, mode="train")(ll.Named(x, (B, feat))).align(B, feat)
    dropped = out == 0
    assert 0.2 < dropped.float().mean().item() < 0.3
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.75)


def test_dropout_draws_a_new_mask_each_call():
    feat = ll.Dim("feat", 100)
    prog = ll.compile(ll.nn.Dropout(0.5), mode="train")
    x = ll.Named(torch.ones(2, 100), (B, feat))
    assert not torch.equal(prog(x).tensor, prog(x).tensor)


def test_dropout_shares_its_mask_along_broadcast_dims():
    t, feat = ll.Dim("time"), ll.Dim("feat", 200)
    prog = ll.compile(ll.nn.Dropout(0.5, broadcast_over=[t]), mode="train")
    out = prog(ll.Named(torch.ones(3, 6, 200), (B, t, feat), lengths={t: torch.tensor([6, 6, 6])}))
    y = out.align(B, t, feat)
    assert torch.equal(y, y[:, :1].expand_as(y))
    assert (y == 0).any() and (y == 2).any()


@pytest.mark.parametrize("mode", ["eval", "search"])
def test_dropout_is_identity_outside_train_mode(mode):
    feat = ll.Dim("feat", 50)
    model = ll.nn.Dropout(0.5)
    x = torch.randn(3, 50)
    prog = ll.compile(model, mode=mode)
    assert torch.equal(prog(ll.Named(x, (B, feat))).align(B, feat), x)
    assert [n.op for n in prog.traces[0].graph.nodes] == ["input"]


def test_feed_forward_dropout_only_in_train_mode():
    torch.manual_seed(0)
    feat, hidden = ll.Dim("feat", 4), ll.Dim("hidden", 64)
    model = ll.nn.FeedForward(feat, hidden, dropout=0.5)
    train, ev = ll.compile(model, mode="train"), ll.compile(model, mode="eval")
    x = ll.Named(torch.randn(8, 4), (B, feat))
    ev(x)
    train(x)
    assert "dropout" in [n.op for n in train.traces[0].graph.nodes]
    assert "dropout" not in [n.op for n in ev.traces[0].graph.nodes]
    assert torch.equal(ev(x).tensor, ev(x).tensor)
    assert not torch.equal(train(x).tensor, ev(x).tensor)


def test_train_and_eval_programs_share_parameters_without_interfering():
    torch.manual_seed(0)
    t, feat, hidden = ll.Dim("time"), ll.Dim("feat", 4), ll.Dim("hidden", 8)
    model = ll.nn.FeedForward(feat, hidden)
    train, ev = ll.compile(model, mode="train"), ll.compile(model, mode="eval")
    x = torch.randn(2, 5, 4)
    lens = torch.tensor([5, 3])
    named = ll.Named(x, (B, t, feat), lengths={t: lens})

    def torch_forward():
        up, down = model.up, model.down
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(
            x, up.weight.detach(), up.bias.detach())), down.weight.detach(), down.bias.detach())

    before = torch_forward()
    with torch.no_grad():
        torch.testing.assert_close(ev(named).align(B, t, feat), before)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = ll.compile(lambda v: ll.mean(model(v), axis=(B, t, feat)), mode="train")(named).tensor
    loss.backward()
    opt.step()
    after = torch_forward()
    assert not torch.allclose(before, after)
    with torch.no_grad():
        torch.testing.assert_close(ev(named).align(B, t, feat), after)
    torch.testing.assert_close(train(named).align(B, t, feat), after)
    assert len(train.traces) == 1 and len(ev.traces) == 1
    assert train.traces[0].graph is not ev.traces[0].graph


# -- training with torch optimizers -----------------------------------------------------------

class NormFF(ll.Module):
    def __init__(self, feat: ll.Dim, hidden: ll.Dim):
        super().__init__()
        self.norm = ll.nn.LayerNorm(feat)
        self.ff = ll.nn.FeedForward(feat, hidden)

    def forward(self, x, *, time: ll.Dim):
        y = x + self.ff(self.norm(x))
        return ll.mean(y * y, axis=(B, time, self.norm.dim))


class TorchNormFF(torch.nn.Module):
    def __init__(self, model: NormFF):
        super().__init__()
        f, h = model.norm.dim.size, model.ff.up.out_dim.size
        self.norm = torch.nn.LayerNorm(f)
        self.up, self.down = torch.nn.Linear(f, h), torch.nn.Linear(h, f)
        with torch.no_grad():
            self.norm.weight.copy_(model.norm.weight)
            self.norm.bias.copy_(model.norm.bias)
        copy_linear(model.ff.up, self.up)
        copy_linear(model.ff.down, self.down)

    def forward(self, x, mask):
        y = x + self.down(torch.relu(self.up(self.norm(x))))
        return masked_mean_torch(y * y, mask)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
], ids=["sgd", "adam"])
def test_optimizer_steps_give_exactly_the_torch_parameters(make_opt):
    torch.manual_seed(0)
    t, feat, hidden = ll.Dim("time"), ll.Dim("feat", 6), ll.Dim("hidden", 10)
    model = NormFF(feat, hidden)
    ref = TorchNormFF(model)
    prog = ll.compile(model, mode="train")
    opt, ref_opt = make_opt(model.parameters()), make_opt(ref.parameters())
    for step in range(4):
        x = torch.randn(3, 7, 6)
        lens = torch.tensor([7, 4, 2])
        opt.zero_grad()
        loss = prog(ll.Named(x, (B, t, feat), lengths={t: lens}), time=t).tensor
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref_loss = ref(x, lengths_mask(lens, 7))
        ref_loss.backward()
        ref_opt.step()
        assert torch.equal(loss, ref_loss), step
    pairs = [(model.norm.weight, ref.norm.weight), (model.norm.bias, ref.norm.bias),
             (model.ff.up.weight, ref.up.weight), (model.ff.up.bias, ref.up.bias),
             (model.ff.down.weight, ref.down.weight), (model.ff.down.bias, ref.down.bias)]
    for mine, theirs in pairs:
        assert torch.equal(mine, theirs)
    assert len(prog.traces) == 1


# -- dtypes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_converted_to_dtype_runs_in_that_dtype(dtype):
    torch.manual_seed(0)
    t, feat, hidden = ll.Dim("time"), ll.Dim("feat", 6), ll.Dim("hidden", 10)
    model = NormFF(feat, hidden)
    ref = TorchNormFF(model)
    prog = ll.compile(model, mode="train")
    x = torch.randn(3, 7, 6)
    lens = torch.tensor([7, 4, 2])
    loss32 = prog(ll.Named(x, (B, t, feat), lengths={t: lens}), time=t).tensor
    assert loss32.dtype == torch.float32

    model.to(dtype)
    ref.to(dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    loss = prog(ll.Named(x.to(dtype), (B, t, feat), lengths={t: lens}), time=t).tensor
    assert loss.dtype == dtype
    assert len(prog.traces) == 2  # the new parameter dtype is a new signature
    loss.backward()
    assert all(p.grad.dtype == dtype for p in model.parameters())
    ref_loss = ref(x.to(dtype), lengths_mask(lens, 7))
    torch.testing.assert_close(loss, ref_loss)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(loss.float(), loss32.detach(), atol=tol, rtol=tol)


def test_model_in_float64_from_the_start():
    t, feat = ll.Dim("time"), ll.Dim("feat", 4)
    model = ll.nn.FeedForward(feat, ll.Dim("hidden", 8)).to(torch.float64)
    out = ll.compile(model)(ll.Named(torch.randn(2, 3, 4, dtype=torch.float64), (B, t, feat),
                                     lengths={t: torch.tensor([3, 1])}))
    assert out.tensor.dtype == torch.float64


# -- source lines -----------------------------------------------------------------------------

def test_nodes_of_a_module_call_point_at_the_users_line():
    feat = ll.Dim("feat", 4)
    model = CalledTwice(feat)
    trace = ll.compile(model).trace(ll.Spec((B, feat)))
    linear_sources = [n.source for n in trace.graph.nodes if n.op == "linear"]
    assert all(s.startswith(__file__ + ":") for s in linear_sources), linear_sources
