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
