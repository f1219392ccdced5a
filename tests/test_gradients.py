"""Gradients through traced programs equal those of the same model written in plain PyTorch.

Both parameter gradients and gradients with respect to the program's inputs
are compared, with dynamic (padded) time dims whose padding must receive no
gradient and must not influence any other gradient.
"""

import pytest
import torch
import torch.nn.functional as F

import looplift as ll

B = ll.batch_dim


def lengths_mask(lens: torch.Tensor, t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < lens[:, None]


def param_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in module.named_parameters()}


# -- stacked feed-forward + layer-norm blocks, masked mean loss ---------------------------------

class Block(ll.Module):
    def __init__(self, feat: ll.Dim, hidden: ll.Dim):
        super().__init__()
        self.norm = ll.nn.LayerNorm(feat)
        self.ff = ll.nn.FeedForward(feat, hidden, activation=ll.gelu)

    def forward(self, x):
        return x + self.ff(self.norm(x))


class Encoder(ll.Module):
    def __init__(self, feat: ll.Dim, hidden: ll.Dim, n: int):
        super().__init__()
        self.feat = feat
        self.blocks = torch.nn.ModuleList([Block(feat, hidden) for _ in range(n)])
        self.final_norm = ll.nn.LayerNorm(feat)

    def forward(self, x, *, time: ll.Dim):
        for block in self.blocks:
            x = block(x)
        y = self.final_norm(x)
        return ll.mean(ll.tanh(y) * y, axis=(B, time, self.feat))


class TorchEncoder(torch.nn.Module):
    """The same model in plain PyTorch, with the looplift model's weights copied over."""

    def __init__(self, model: Encoder):
        super().__init__()
        f = model.feat.size
        h = model.blocks[0].ff.up.out_dim.size
        self.blocks = torch.nn.ModuleList()
        for _ in model.blocks:
            self.blocks.append(torch.nn.ModuleDict({
                "norm": torch.nn.LayerNorm(f),
                "ff": torch.nn.ModuleDict({"up": torch.nn.Linear(f, h), "down": torch.nn.Linear(h, f)})}))
        self.final_norm = torch.nn.LayerNorm(f)
        self.load_state_dict(model.state_dict())

    def forward(self, x, mask):
        for block in self.blocks:
            ff = block["ff"]
            x = x + ff["down"](F.gelu(ff["up"](block["norm"](x))))
        y = self.final_norm(x)
        v = (torch.tanh(y) * y) * mask[:, :, None]
        return v.sum() / (mask.sum() * y.shape[-1])


def randomize(model: torch.nn.Module) -> None:
    """Layer norm parameters start at 1 and 0; make them generic so their gradients mean something."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture
def encoder_setup():
    torch.manual_seed(0)
    t, feat, hidden = ll.Dim("time"), ll.Dim("feat", 8), ll.Dim("hidden", 16)
    model = Encoder(feat, hidden, 3)
    randomize(model)
    ref = TorchEncoder(model)
    lens = torch.tensor([9, 4, 1, 6])
    x = torch.randn(4, 9, 8)
    mask = lengths_mask(lens, 9)
    x_padded = torch.where(mask[:, :, None], x, torch.full_like(x, 1e4))  # padding must not matter
    return model, ref, t, feat, lens, x, x_padded, mask


def test_encoder_parameter_and_input_gradients_equal_torch(encoder_setup):
    model, ref, t, feat, lens, x, x_padded, mask = encoder_setup
    prog = ll.compile(model, mode="train")
    xin = x_padded.clone().requires_grad_(True)
    loss = prog(ll.Named(xin, (B, t, feat), lengths={t: lens}), time=t).tensor
    loss.backward()

    xref = x.clone().requires_grad_(True)
    ref_loss = ref(xref, mask)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss)
    mine, theirs = param_grads(model), param_grads(ref)
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], msg=name)
    valid = mask[:, :, None].expand_as(x)
    torch.testing.assert_close(xin.grad[valid], xref.grad[valid])
    assert torch.equal(xin.grad[~valid], torch.zeros_like(xin.grad[~valid]))


def test_encoder_gradients_with_feature_first_storage_equal_torch(encoder_setup):
    model, ref, t, feat, lens, x, x_padded, mask = encoder_setup
    xin = x_padded.permute(2, 1, 0).clone().requires_grad_(True)  # (feat, time, batch)
    loss = ll.compile(model)(ll.Named(xin, (feat, t, B), lengths={t: lens}), time=t).tensor
    loss.backward()
    xref = x.clone().requires_grad_(True)
    ref(xref, mask).backward()
    for name, g in param_grads(model).items():
        torch.testing.assert_close(g, param_grads(ref)[name], msg=name)
    valid = mask[:, :, None].expand_as(x)
    torch.testing.assert_close(xin.grad.permute(2, 1, 0)[valid], xref.grad[valid])


def test_encoder_gradient_of_one_sequence_alone_equals_in_batch(encoder_setup):
    model, _, t, feat, lens, _, x_padded, _ = encoder_setup
    prog = ll.compile(model)
    i, n = 1, int(lens[1])
    grads = []
    for x, ln in ((x_padded[i:i + 1, :n], lens[i:i + 1]), (x_padded[i:i + 1], lens[i:i + 1])):
        x = x.clone().requires_grad_(True)
        prog(ll.Named(x, (B, t, feat), lengths={t: ln}), time=t).tensor.backward()
        grads.append(x.grad[:, :n])
    torch.testing.assert_close(grads[0], grads[1])


def test_reference_interpreter_gives_the_same_gradients(encoder_setup):
    model, _, t, feat, lens, _, x_padded, _ = encoder_setup
    prog = ll.compile(model)
    results = []
    for run in (prog, prog.reference):
        model.zero_grad()
        xin = x_padded.clone().requires_grad_(True)
        run(ll.Named(xin, (B, t, feat), lengths={t: lens}), time=t).tensor.backward()
        results.append([xin.grad] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# -- conv1d + linear + cross entropy ----------------------------------------------------------

class ConvClassifier(ll.Module):
    def __init__(self, feat: ll.Dim, channels: ll.Dim, vocab: ll.Dim, *, stride: int = 1):
        super().__init__()
        self.vocab = vocab
        self.conv = ll.nn.Conv1d(feat, channels, 3, stride=stride)
        self.out = ll.nn.Linear(channels, vocab)

    def forward(self, x, targets, *, time: ll.Dim, target_time: ll.Dim):
        h = ll.relu(self.conv(x, axis=time))
        if target_time is not time:
            h = ll.replace_dim(h, time.ceildiv(self.conv.stride), target_time)
        logits = self.out(h)
        ce = ll.cross_entropy(logits, targets, axis=self.vocab)
        return ll.sum(ce, axis=(B, target_time)) / ll.cast(ll.sum(ll.length(target_time), axis=B), "float32")


def torch_conv_classifier(model: ConvClassifier, x, targets, mask, out_mask, stride: int):
    w, b = model.conv.weight, model.conv.bias
    xz = x.masked_fill(~mask[:, :, None], 0).transpose(1, 2)
    h = torch.relu(F.conv1d(F.pad(xz, (1, 1)), w, b, stride=stride)).transpose(1, 2)
    logits = F.linear(h, model.out.weight, model.out.bias)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce.reshape(targets.shape) * out_mask).sum() / out_mask.sum()


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_linear_cross_entropy_gradients_equal_torch(stride):
    torch.manual_seed(0)
    t, feat, channels, vocab = ll.Dim("time"), ll.Dim("feat", 5), ll.Dim("channels", 7), ll.Dim("vocab", 6)
    target_time = t if stride == 1 else ll.Dim("frames")
    model = ConvClassifier(feat, channels, vocab, stride=stride)
    lens = torch.tensor([8, 5, 2])
    out_lens = (lens + stride - 1) // stride
    mask = lengths_mask(lens, 8)
    out_mask = lengths_mask(out_lens, (8 + stride - 1) // stride)
    x = torch.randn(3, 8, 5)
    targets = torch.randint(0, 6, out_mask.shape)
    x_padded = torch.where(mask[:, :, None], x, torch.full_like(x, -7.0))
    targets_padded = torch.where(out_mask, targets, torch.full_like(targets, 99))  # out of range at padding

    xin = x_padded.clone().requires_grad_(True)
    named_targets = ll.Named(targets_padded, (B, target_time), lengths={target_time: out_lens}, sparse_dim=vocab)
    loss = ll.compile(model)(ll.Named(xin, (B, t, feat), lengths={t: lens}), named_targets,
                             time=t, target_time=target_time).tensor
    loss.backward()
    mine = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    xref = x.clone().requires_grad_(True)
    ref_loss = torch_conv_classifier(model, xref, targets, mask, out_mask, stride)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(mine[name], p.grad, msg=name)
    valid = mask[:, :, None].expand_as(x)
    torch.testing.assert_close(xin.grad[valid], xref.grad[valid])
    assert torch.equal(xin.grad[~valid], torch.zeros_like(xin.grad[~valid]))


def test_conv_classifier_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    t, feat, channels, vocab = ll.Dim("time"), ll.Dim("feat", 3), ll.Dim("channels", 4), ll.Dim("vocab", 5)
    model = ConvClassifier(feat, channels, vocab).to(torch.float64)
    prog = ll.compile(model)
    lens = torch.tensor([5, 3])
    targets = ll.Named(torch.randint(0, 5, (2, 5)), (B, t), lengths={t: lens}, sparse_dim=vocab)

    def loss_of(x):
        return prog(ll.Named(x, (B, t, feat), lengths={t: lens}), targets, time=t, target_time=t).tensor

    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss_of, (x,))
