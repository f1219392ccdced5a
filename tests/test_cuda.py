"""On a machine with CUDA: programs run on the GPU and agree with the CPU (skipped without CUDA)."""

import pytest
import torch

import looplift as ll

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, T, F = ll.batch_dim, ll.Dim("time"), ll.Dim("feat", 8)


def test_program_on_cuda_matches_cpu_outputs_and_gradients():
    torch.manual_seed(0)
    model = ll.nn.FeedForward(F, ll.Dim("hidden", 16)).double()
    norm = ll.nn.LayerNorm(F).double()

    def loss(x):
        h = norm(x + model(x))
        return ll.sum(ll.log_softmax(h, axis=T) * h, axis=[B, T, F]), ll.pad(h, axis=T, left=1, right=2)

    prog = ll.compile(loss, mode="train")
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    n = torch.tensor([7, 2, 5])
    results = {}
    for device in ("cpu", "cuda"):
        model.to(device), norm.to(device)
        model.zero_grad()
        total, padded = prog(ll.Named(x.to(device), (B, T, F), {T: n.to(device)}))
        total.tensor.backward()
        results[device] = (total.tensor.cpu(), padded.tensor.cpu(), padded.lengths[T + 3].cpu(),
                           model.up.weight.grad.cpu())
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(a, b)


def test_rnnt_loss_and_alignment_on_cuda_match_cpu():
    enc, lab, vocab = ll.Dim("enc_time"), ll.Dim("labels"), ll.Dim("vocab", 5)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(1, 5, (3, 3), generator=g)
    t_len, u_len = torch.tensor([6, 1, 4]), torch.tensor([3, 0, 2])

    def loss_and_path(s, y):
        args = dict(blank=0, enc_time=enc, prefix=lab + 1, axis=vocab)
        return ll.sum(ll.rnnt_loss(s, y, **args), axis=B), ll.rnnt_align(s, y, **args)

    prog = ll.compile(loss_and_path)
    results = {}
    for device in ("cpu", "cuda"):
        x = scores.to(device).requires_grad_(True)
        loss, path = prog(ll.Named(x, (B, enc, lab + 1, vocab), {enc: t_len.to(device)}),
                          ll.Named(labels.to(device), (B, lab), {lab: u_len.to(device)}, sparse_dim=vocab))
        loss.tensor.backward()
        results[device] = (loss.tensor.detach().cpu(), x.grad.cpu(), path.tensor.cpu())
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(a, b)
