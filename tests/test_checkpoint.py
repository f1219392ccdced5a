"""Checkpoints: safetensors files keyed by parameter names, written atomically, loaded strictly."""

import errno
import os

import pytest
import torch
from error_helpers import marked_line
from safetensors import safe_open
from safetensors.torch import save_file

import looplift as ll
from looplift.errors import CheckpointError
from looplift.train import checkpoint as ckpt_module

B = ll.batch_dim


class Net(ll.Module):
    def __init__(self, vocab: ll.Dim, feat: ll.Dim, hidden: ll.Dim):
        super().__init__()
        self.emb = ll.nn.Embedding(vocab, feat)
        self.blocks = torch.nn.ModuleList([ll.nn.FeedForward(feat, hidden) for _ in range(2)])
        self.norm = ll.nn.LayerNorm(feat)
        self.conv = ll.nn.Conv1d(feat, ll.Dim("channels", 5), 3)  # saved, though unused by forward
        self.readout = ll.nn.Linear(feat, vocab)

    def forward(self, labels):
        x = self.emb(labels)
        for block in self.blocks:
            x = x + block(self.norm(x))
        return self.readout(x)


def make_net() -> Net:
    return Net(ll.Dim("vocab", 7), ll.Dim("feat", 4), ll.Dim("hidden", 6))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == state.keys()
    for k in state:
        assert current[k].dtype == state[k].dtype, k
        assert torch.equal(current[k], state[k]), k


def perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def stray_files(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp") or name.startswith("."))


# -- round trip ---------------------------------------------------------------------------------

def test_round_trip_restores_the_state_bitwise(tmp_path):
    torch.manual_seed(0)
    model = make_net()
    saved = snapshot(model)
    path = tmp_path / "model.safetensors"
    ll.save(model, path)
    perturb(model)
    assert not torch.equal(model.emb.weight, saved["emb.weight"])
    ll.load(model, path)
    assert_state_equal(model, saved)
    assert stray_files(tmp_path) == []


def test_round_trip_into_a_fresh_model_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = make_net()
    path = tmp_path / "model.safetensors"
    ll.save(model, path)
    other = Net(model.emb.vocab, model.emb.out_dim, model.blocks[0].up.out_dim)
    ll.load(other, str(path))  # str paths work as well
    time = ll.Dim("time")
    labels = ll.Named(torch.randint(0, 7, (2, 5)), (B, time), lengths={time: torch.tensor([5, 3])},
                      sparse_dim=model.emb.vocab)
    assert torch.equal(ll.compile(model, mode="eval")(labels).tensor, ll.compile(other, mode="eval")(labels).tensor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_round_trip_keeps_the_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    model = make_net().to(dtype)
    saved = snapshot(model)
    ll.save(model, tmp_path / "m.safetensors")
    perturb(model)
    ll.load(model, tmp_path / "m.safetensors")
    assert_state_equal(model, saved)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.get_tensor("emb.weight").dtype == dtype


def test_load_converts_into_the_models_dtype(tmp_path):
    torch.manual_seed(0)
    model = make_net()
    ll.save(model, tmp_path / "m.safetensors")
    wide = make_net().to(torch.float64)
    ll.load(wide, tmp_path / "m.safetensors")
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    for (name, p), q in zip(wide.named_parameters(), model.parameters()):
        assert torch.equal(p, q.double()), name


def test_buffers_are_saved_unless_non_persistent(tmp_path):
    class WithBuffers(ll.Module):
        def __init__(self):
            super().__init__()
            self.lin = ll.nn.Linear(ll.Dim("a", 2), ll.Dim("b", 3))
            self.register_buffer("steps", torch.tensor([3]))
            self.register_buffer("cache", torch.zeros(2), persistent=False)

    model = WithBuffers()
    path = tmp_path / "m.safetensors"
    ll.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["lin.bias", "lin.weight", "steps"]
    model.steps.fill_(0)
    ll.load(model, path)
    assert torch.equal(model.steps, torch.tensor([3]))


# -- the file --------------------------------------------------------------------------------

def test_file_is_safetensors_keyed_by_parameter_names(tmp_path):
    torch.manual_seed(0)
    model = make_net()
    path = tmp_path / "model.safetensors"
    ll.save(model, path, metadata={"step": "12"})
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(name for name, _ in model.named_parameters())
        for name, p in model.named_parameters():
            assert torch.equal(f.get_tensor(name), p.detach()), name
        assert f.metadata() == {"step": "12"}
    assert "blocks.1.down.weight" in dict(model.named_parameters())


class Shared(ll.Module):
    def __init__(self):
        super().__init__()
        vocab, feat = ll.Dim("vocab", 5), ll.Dim("feat", 3)
        self.emb = ll.nn.Embedding(vocab, feat)
        self.readout = ll.nn.Linear(feat, vocab, with_bias=False)
        self.readout.weight = self.emb.weight  # tied weights
        self.ff = ll.nn.FeedForward(feat, ll.Dim("hidden", 4))
        self.ff_again = self.ff  # one module under two attributes


def test_shared_parameters_are_stored_once(tmp_path):
    torch.manual_seed(0)
    model = Shared()
    path = tmp_path / "shared.safetensors"
    ll.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["emb.weight", "ff.down.bias", "ff.down.weight", "ff.up.bias", "ff.up.weight"]
    saved = snapshot(model)
    perturb(model)
    ll.load(model, path)
    assert_state_equal(model, saved)
    assert model.readout.weight is model.emb.weight
    assert model.ff_again is model.ff


# -- atomic saves ------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def _raise(*args, **kwargs):
    raise Interrupted("interrupted")


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_interrupted_save_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch, where):
    torch.manual_seed(0)
    model = make_net()
    path = tmp_path / "model.safetensors"
    ll.save(model, path)
    before = path.read_bytes()
    perturb(model)

    if where == "replace":
        monkeypatch.setattr(ckpt_module.os, "replace", _raise)
    elif where == "fsync":
        monkeypatch.setattr(ckpt_module.os, "fsync", _raise)
    else:
        real_fdopen = os.fdopen

        def half_writing_fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            real_write = f.write

            class HalfWriter:
                def __enter__(self):
                    f.__enter__()
                    return self

                def __exit__(self, *exc):
                    return f.__exit__(*exc)

                def write(self, data):
                    real_write(data[:len(data) // 2])
                    raise Interrupted("disk full")

                def __getattr__(self, name):
                    return getattr(f, name)

            return HalfWriter()

        monkeypatch.setattr(ckpt_module.os, "fdopen", half_writing_fdopen)

    with pytest.raises(Interrupted):
        ll.save(model, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_a_full_disk_is_a_checkpoint_write_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """A write failing with ENOSPC: a CheckpointWriteError (an OSError with its errno) at the save's line, the
    previous file intact, no temporary file left."""
    model = make_net()
    path = tmp_path / "model.safetensors"
    ll.save(model, path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_module.os, "fsync", no_space)
    with pytest.raises(ll.errors.CheckpointWriteError) as info:
        ll.save(model, path)  # <full-disk>
    monkeypatch.undo()
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert "No space left on device" in str(info.value)
    assert marked_line(__file__, "full-disk") in str(info.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_interrupted_first_save_creates_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_module.os, "replace", _raise)
    with pytest.raises(Interrupted):
        ll.save(make_net(), tmp_path / "new.safetensors")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_saved_file_has_the_permissions_of_a_plainly_written_file(tmp_path):
    ll.save(make_net(), tmp_path / "m.safetensors")
    (tmp_path / "plain").write_bytes(b"")
    mode = os.stat(tmp_path / "m.safetensors").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777


def test_save_creates_missing_directories(tmp_path):
    path = tmp_path / "a" / "b" / "m.safetensors"
    model = make_net()
    ll.save(model, path)
    assert os.listdir(path.parent) == ["m.safetensors"]


# -- strict loads -------------------------------------------------------------------------------

def test_load_lists_every_missing_unexpected_and_mis_shaped_entry(tmp_path):
    torch.manual_seed(0)
    model = make_net()
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    del state["norm.bias"]
    del state["blocks.1.up.weight"]
    state["extra.weight"] = torch.zeros(2, 2)
    state["old.bias"] = torch.zeros(3)
    state["readout.weight"] = torch.zeros(4, 7)  # transposed
    state["conv.bias"] = torch.zeros(6)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    before = snapshot(model)

    with pytest.raises(CheckpointError) as info:
        ll.load(model, path)
    message = str(info.value)
    for name in ["norm.bias", "blocks.1.up.weight", "extra.weight", "old.bias", "readout.weight", "conv.bias"]:
        assert name in message, name
    assert "missing: norm.bias" in message and "missing: blocks.1.up.weight" in message
    assert "unexpected: extra.weight" in message and "unexpected: old.bias" in message
    assert "mis-shaped: readout.weight: the checkpoint has (4, 7), the model (7, 4)" in message
    assert "mis-shaped: conv.bias: the checkpoint has (6,), the model (5,)" in message
    assert "6 problems" in message
    assert str(path) in message
    assert_state_equal(model, before)


def test_load_with_only_a_mis_shaped_entry_changes_nothing(tmp_path):
    torch.manual_seed(0)
    model = make_net()
    state = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    state["emb.weight"] = torch.randn(8, 4)
    save_file(state, str(tmp_path / "m.safetensors"))
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"mis-shaped: emb\.weight"):
        ll.load(model, tmp_path / "m.safetensors")
    assert_state_equal(model, before)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    torch.manual_seed(0)
    ll.save(ll.nn.Linear(ll.Dim("a", 2), ll.Dim("b", 3)), tmp_path / "linear.safetensors")
    model = make_net()
    before = snapshot(model)
    with pytest.raises(CheckpointError) as info:
        ll.load(model, tmp_path / "linear.safetensors")
    message = str(info.value)
    for name, _ in model.named_parameters():
        assert f"missing: {name}" in message
    assert "unexpected: weight" in message and "unexpected: bias" in message
    assert_state_equal(model, before)


@pytest.mark.parametrize("content", [
    b"this is not a checkpoint at all, just some text",
    b"\x00\x01",
    b"",
    b"\xff" * 64,
    (20).to_bytes(8, "little") + b"{not json!!!!!!!!!!}",
], ids=["text", "short", "empty", "huge-header", "bad-json"])
def test_corrupt_file_raises_checkpoint_error(tmp_path, content):
    model = make_net()
    before = snapshot(model)
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        ll.load(model, path)
    assert_state_equal(model, before)


def test_truncated_file_raises_checkpoint_error(tmp_path):
    model = make_net()
    path = tmp_path / "m.safetensors"
    ll.save(model, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 40])
    before = snapshot(model)
    with pytest.raises(CheckpointError):
        ll.load(model, path)
    assert_state_equal(model, before)


def test_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing-here"):
        ll.load(make_net(), tmp_path / "nothing-here.safetensors")
