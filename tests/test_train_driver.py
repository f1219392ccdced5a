"""The training driver: bucketed batches, exact loss normalization, checkpoints, exact resume, data parallel."""

import copy
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

import looplift as ll
from looplift.errors import CheckpointError
from looplift.train import Trainer, bucketed_batches, load_model

PAD = -100


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: more threads only wait for each other, the more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- a tiny tagger and its data --------------------------------------------------------------------

class Tagger(torch.nn.Module):
    """Tags each token of a sequence: embedding, dropout, LSTM, linear."""

    def __init__(self, vocab: int = 7, hidden: int = 8, classes: int = 3, dropout: float = 0.0):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.drop = torch.nn.Dropout(dropout)
        self.rnn = torch.nn.LSTM(hidden, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, classes)

    def forward(self, tokens):
        return self.out(self.drop(self.rnn(self.drop(self.emb(tokens)))[0]))


def make_items(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (n,), generator=g).tolist()
    return [(torch.randint(0, 7, (t,), generator=g), torch.randint(0, 3, (t,), generator=g)) for t in lengths]


ITEMS = make_items(20, seed=0)          # 5 batches of 4 per epoch
LENGTHS = [len(tokens) for tokens, _ in ITEMS]


def collate(items):
    width = max(len(tokens) for tokens, _ in items)
    tokens = torch.stack([F.pad(t, (0, width - len(t))) for t, _ in items])
    labels = torch.stack([F.pad(y, (0, width - len(y)), value=PAD) for _, y in items])
    return tokens, labels


def tagger_loss(model, batch):
    tokens, labels = batch
    logits = model(tokens)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=PAD, reduction="sum")
    return loss_sum, int((labels != PAD).sum())


def make_batches(epoch, world_size=1, rank=0):
    return [collate([ITEMS[i] for i in b])
            for b in bucketed_batches(LENGTHS, batch_size=4, seed=0, epoch=epoch, world_size=world_size, rank=rank)]


def make_tagger_trainer(directory=None, *, seed=0, dropout=0.3, hidden=8, optimizer="adam", scheduler=True,
                        loss_fn=tagger_loss, progress=False, **options):
    torch.manual_seed(seed)
    model = Tagger(hidden=hidden, dropout=dropout)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + 0.1 * step)) if scheduler else None
    return Trainer(model, loss_fn, opt, scheduler=sched, checkpoint_dir=directory, progress=progress, **options)


def noisy_evaluate(model):
    """An evaluation that draws random numbers: training must not notice."""
    tokens, labels = collate(ITEMS[:4])
    loss_sum, count = tagger_loss(model, (tokens, labels))
    return {"loss": loss_sum.item() / count, "noise": torch.rand(()).item()}


def snapshot(trainer):
    return {"model": copy.deepcopy(trainer.model.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
            "position": (trainer.epoch, trainer.step_in_epoch, trainer.global_step)}


def assert_same_training_state(a, b):
    """Bit-identical model, optimizer and scheduler state, position and history."""
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name]), name
    assert_same_optimizer_state(a.optimizer.state_dict(), b.optimizer.state_dict())
    if a.scheduler is not None:
        assert a.scheduler.state_dict() == b.scheduler.state_dict()
    assert (a.epoch, a.step_in_epoch, a.global_step) == (b.epoch, b.step_in_epoch, b.global_step)
    assert [(h["epoch"], h["steps"], h["train_loss"], h["items"]) for h in a.history if h["complete"]] == \
           [(h["epoch"], h["steps"], h["train_loss"], h["items"]) for h in b.history if h["complete"]]


def assert_same_optimizer_state(a, b):
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][key])), (index, key)
    assert a["param_groups"] == b["param_groups"]


# -- bucketed_batches ------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 50), max_size=120), batch_size=st.integers(1, 9),
       seed=st.integers(0, 3), epoch=st.integers(0, 3))
def test_bucketed_batches_take_every_index_once_in_batches_of_batch_size(lengths, batch_size, seed, epoch):
    batches = bucketed_batches(lengths, batch_size=batch_size, seed=seed, epoch=epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    sizes = sorted(len(b) for b in batches)
    assert all(size == batch_size for size in sizes[1:]) and all(0 < size <= batch_size for size in sizes)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 50), max_size=120), world_size=st.integers(2, 4),
       extra=st.integers(0, 5), epoch=st.integers(0, 2))
def test_bucketed_shards_partition_each_global_batch(lengths, world_size, extra, epoch):
    batch_size = world_size + extra
    global_batches = bucketed_batches(lengths, batch_size=batch_size, seed=1, epoch=epoch)
    shards = [bucketed_batches(lengths, batch_size=batch_size, seed=1, epoch=epoch, world_size=world_size, rank=r)
              for r in range(world_size)]
    kept = [b for b in global_batches if len(b) >= world_size]   # a smaller (last) global batch is dropped
    assert len(global_batches) - len(kept) <= 1
    assert all(len(s) == len(kept) for s in shards)            # every rank takes the same number of steps
    for k, batch in enumerate(kept):
        parts = [s[k] for s in shards]
        assert [i for part in parts for i in part] == batch    # contiguous slices, in rank order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1


def test_bucketed_batches_are_deterministic_and_differ_across_epochs_and_seeds():
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    first = bucketed_batches(LENGTHS * 10, batch_size=4, seed=0, epoch=0)
    assert first == bucketed_batches(LENGTHS * 10, batch_size=4, seed=0, epoch=0)
    assert first != bucketed_batches(LENGTHS * 10, batch_size=4, seed=0, epoch=1)
    assert first != bucketed_batches(LENGTHS * 10, batch_size=4, seed=1, epoch=0)
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == python_rng


def test_bucketed_batches_group_similar_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 101, (2000,), generator=g).tolist()

    def mean_spread(batches):
        return sum(max(lengths[i] for i in b) / min(lengths[i] for i in b) for b in batches) / len(batches)

    bucketed = bucketed_batches(lengths, batch_size=10, seed=0, epoch=0)
    perm = torch.randperm(2000, generator=g).tolist()
    random_batches = [perm[s:s + 10] for s in range(0, 2000, 10)]
    assert mean_spread(bucketed) < 1.2
    assert mean_spread(random_batches) > 5


def test_bucketed_batches_without_shuffle_are_sorted_by_length():
    batches = bucketed_batches([5, 1, 4, 1, 3], batch_size=2, seed=0, epoch=0, shuffle=False)
    assert batches == [[1, 3], [4, 2], [0]]
    assert batches == bucketed_batches([5, 1, 4, 1, 3], batch_size=2, seed=7, epoch=3, shuffle=False)


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"batch_size": 2, "world_size": 3, "rank": 0}, "smaller than world_size 3"),
    ({"batch_size": 4, "world_size": 2, "rank": 2}, "rank must be in range"),
])
def test_bucketed_batches_reject_bad_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        bucketed_batches([1, 2, 3], seed=0, epoch=0, **options)


# -- a step ----------------------------------------------------------------------------------------

def test_a_steps_gradient_is_that_of_the_loss_summed_over_the_batch_over_its_item_count():
    torch.manual_seed(0)
    model = Tagger()
    reference = copy.deepcopy(model)
    items = [ITEMS[i] for i in range(5)]
    assert len({len(t) for t, _ in items}) > 2   # so a mean of per-item means would differ
    trainer = Trainer(model, tagger_loss, torch.optim.SGD(model.parameters(), lr=0.0), clip_norm=None, progress=False)
    trainer.fit(lambda epoch: [collate(items)], max_steps=1)

    total = sum(F.cross_entropy(reference(tokens[None])[0], labels, reduction="sum") for tokens, labels in items)
    (total / sum(len(labels) for _, labels in items)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradients_are_clipped_to_clip_norm():
    torch.manual_seed(0)
    model = Tagger()
    reference = copy.deepcopy(model)
    batch = collate(ITEMS[:4])
    trainer = Trainer(model, tagger_loss, torch.optim.SGD(model.parameters(), lr=0.0), clip_norm=1e-3, progress=False)
    trainer.fit(lambda epoch: [batch], max_steps=1)

    loss_sum, count = tagger_loss(reference, batch)
    (loss_sum / count).backward()
    norm = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in reference.parameters()]))
    assert norm > 1e-2
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad * (1e-3 / norm), rtol=1e-4, atol=1e-9)


def test_history_reports_the_loss_over_all_items_and_the_evaluation(tmp_path):
    trainer = make_tagger_trainer(dropout=0.0, optimizer="sgd", scheduler=False)
    trainer.optimizer.param_groups[0]["lr"] = 0.0   # the parameters stay, so the loss is known beforehand
    with torch.no_grad():
        losses = [tagger_loss(trainer.model, collate([item])) for item in ITEMS]
    expected = sum(loss.item() for loss, _ in losses) / sum(count for _, count in losses)
    history = trainer.fit(make_batches, epochs=2, evaluate=lambda model: {"answer": 42})
    assert [(h["epoch"], h["complete"], h["steps"], h["epoch_steps"], h["items"]) for h in history] == \
           [(0, True, 5, 5, sum(LENGTHS)), (1, True, 10, 5, sum(LENGTHS))]
    for h in history:
        assert h["train_loss"] == pytest.approx(expected, rel=1e-5)
        assert h["eval"] == {"answer": 42.0} and h["items_per_second"] > 0 and h["seconds"] > 0


def test_progress_shows_a_bar_and_a_line_per_epoch(capsys):
    trainer = make_tagger_trainer()
    trainer.progress = True
    trainer.fit(make_batches, epochs=1, evaluate=lambda model: {"wer": 0.25})
    err = capsys.readouterr().err
    assert "epoch 0:   0%|          | 0/5" in err    # the bar (the test is too fast for it to show more)
    assert "epoch 0: step 5, train loss" in err and "wer 0.25" in err


# -- the best model ---------------------------------------------------------------------------------

def test_keep_best_keeps_the_model_of_the_lowest_evaluation_across_a_resume(tmp_path):
    """A fake evaluation scores the epochs 0.5, 0.3, 0.4 (then, resumed, 0.35 and 0.2): best.safetensors holds
    the model as it was evaluated at 0.3 until 0.2 comes, with the result, value, epoch and step."""
    scores = iter([0.5, 0.3, 0.4, 0.35, 0.2])
    seen = []

    def fake_evaluate(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"dev_wer": next(scores), "other": 1.0}

    def best_file():
        tensors = load_file(tmp_path / "best.safetensors")
        with safe_open(tmp_path / "best.safetensors", framework="pt") as f:
            return tensors, json.loads(f.metadata()["best"])

    trainer = make_tagger_trainer(tmp_path, keep_best="dev_wer")
    trainer.fit(make_batches, epochs=3, evaluate=fake_evaluate)
    tensors, best = best_file()
    assert best == {"result": "dev_wer", "value": 0.3, "epoch": 1, "step": 10}
    assert trainer.best() == (0.3, 1, 10)
    for name, t in seen[1].items():
        assert torch.equal(tensors[name], t), name
    assert not all(torch.equal(tensors[n], t) for n, t in seen[2].items())   # (not merely the last model)

    resumed = make_tagger_trainer(tmp_path, keep_best="dev_wer")
    resumed.fit(make_batches, epochs=4, evaluate=fake_evaluate, resume=True)   # 0.35: no better
    assert best_file()[1]["value"] == 0.3
    resumed.fit(make_batches, epochs=5, evaluate=fake_evaluate)                 # 0.2: the new best
    tensors, best = best_file()
    assert best == {"result": "dev_wer", "value": 0.2, "epoch": 4, "step": 25}
    for name, t in seen[4].items():
        assert torch.equal(tensors[name], t), name


def test_keep_best_needs_a_checkpoint_dir_and_the_result():
    with pytest.raises(ll.errors.ConfigError, match="needs a checkpoint_dir"):
        make_tagger_trainer(None, keep_best="dev_wer")


def test_keep_best_names_a_result_the_evaluation_gives(tmp_path):
    trainer = make_tagger_trainer(tmp_path, keep_best="dev_wer")
    with pytest.raises(ll.errors.ConfigError, match="the evaluation gave no such result, only \\['wer'\\]"):
        trainer.fit(make_batches, epochs=1, evaluate=lambda model: {"wer": 0.25})


# -- the average of the last epochs ----------------------------------------------------------------

def test_average_last_is_the_mean_of_the_models_at_the_last_epochs_ends_across_a_resume(tmp_path):
    """average.safetensors holds the element-wise mean of the models at the ends of the last 3 epochs, as an
    evaluation at each epoch's end saw them; a run stopped within an epoch counts its end; after a resume the
    average goes on over the models kept in epochs/, and older ones are deleted."""
    seen = []

    def record(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {}

    def average_file():
        tensors = load_file(tmp_path / "average.safetensors")
        with safe_open(tmp_path / "average.safetensors", framework="pt") as f:
            return tensors, json.loads(f.metadata()["average"]), f.metadata()["config"]

    def mean(models):
        return {k: torch.stack([m[k] for m in models]).double().mean(0).float() for k in models[0]}

    trainer = make_tagger_trainer(tmp_path, average_last=3, metadata={"config": "{}"})
    trainer.fit(make_batches, epochs=2, evaluate=record)
    tensors, average, config = average_file()
    assert average == {"epochs": [0, 1]} and config == "{}"
    for name, t in mean(seen[:2]).items():
        torch.testing.assert_close(tensors[name], t, rtol=0, atol=1e-7)
    assert not all(torch.equal(tensors[n], t) for n, t in seen[1].items())   # (not merely the last model)

    resumed = make_tagger_trainer(tmp_path, average_last=3, metadata={"config": "{}"})
    resumed.fit(make_batches, epochs=4, evaluate=record, resume=True)
    tensors, average, _ = average_file()
    assert average == {"epochs": [1, 2, 3]}
    for name, t in mean(seen[1:4]).items():
        torch.testing.assert_close(tensors[name], t, rtol=0, atol=1e-7)
    assert sorted(os.listdir(tmp_path / "epochs")) == [f"epoch-{e}.safetensors" for e in (1, 2, 3)]

    resumed.fit(make_batches, max_steps=22, evaluate=record)   # stopped 2 steps into epoch 4: its end counts
    tensors, average, _ = average_file()
    assert average == {"epochs": [2, 3, 4]}
    for name, t in mean(seen[2:5]).items():
        torch.testing.assert_close(tensors[name], t, rtol=0, atol=1e-7)


def test_average_last_needs_a_checkpoint_dir_and_a_number_of_epochs(tmp_path):
    with pytest.raises(ll.errors.ConfigError, match="needs a checkpoint_dir"):
        make_tagger_trainer(None, average_last=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ll.errors.ConfigError, match="average_last is a number of epochs"):
            make_tagger_trainer(tmp_path, average_last=bad)


# -- checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_layout(tmp_path):
    trainer = make_tagger_trainer(tmp_path, metadata={"config": '{"hidden": 8}'})
    trainer.fit(make_batches, epochs=1)
    model = trainer.model
    with safe_open(str(tmp_path / "last.safetensors"), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        assert torch.equal(f.get_tensor("rnn.weight_hh_l0"), model.rnn.weight_hh_l0.detach())
        assert torch.equal(f.get_tensor("trainer/optimizer/state/0/exp_avg"),
                           trainer.optimizer.state[model.emb.weight]["exp_avg"])
    model_names = {name for name, _ in model.named_parameters()}
    assert model_names <= keys
    assert all(k.startswith("trainer/") for k in keys - model_names)
    assert {"trainer/rng/0/torch", "trainer/optimizer/state/0/step"} <= keys
    assert metadata["config"] == '{"hidden": 8}'
    position = json.loads(metadata["trainer/position"])
    assert [position[k] for k in ("epoch", "step_in_epoch", "global_step", "world_size")] == [1, 0, 5, 1]
    assert json.loads(metadata["trainer/scheduler"])["class"] == "torch.optim.lr_scheduler.LambdaLR"

    fresh = Tagger()
    ll.load(fresh, tmp_path / "model.safetensors")            # the model-only copy loads with looplift.load
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))
    other = Tagger()
    assert load_model(other, tmp_path / "last.safetensors") == {"config": '{"hidden": 8}'}
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), model.parameters()))
    with pytest.raises(CheckpointError, match="unexpected: trainer/"):
        ll.load(Tagger(), tmp_path / "last.safetensors")      # the training checkpoint is for resume / load_model


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_tagger_trainer(tmp_path)
    trainer.fit(make_batches, epochs=1)
    before = {name: (tmp_path / name).read_bytes() for name in ("last.safetensors", "model.safetensors")}

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)   # the new file is written, not yet flushed and renamed
    with pytest.raises(CheckpointError, match="previous one is kept.*No space left"):
        trainer.fit(make_batches, epochs=2)
    monkeypatch.undo()
    assert trainer.global_step == 10
    assert sorted(os.listdir(tmp_path)) == ["last.safetensors", "model.safetensors"]
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


# -- resume ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stops", [[3, 8], [5, 9], [2, 7, 12]], ids=["within-epoch", "at-epoch-end", "twice"])
def test_stopping_and_resuming_is_bit_identical_to_an_uninterrupted_run(tmp_path, stops):
    uninterrupted = make_tagger_trainer(tmp_path / "a")
    uninterrupted.fit(make_batches, max_steps=stops[-1], evaluate=noisy_evaluate)

    first = make_tagger_trainer(tmp_path / "b")
    first.fit(make_batches, max_steps=stops[0], evaluate=noisy_evaluate)
    for n, stop in enumerate(stops[1:]):
        resumed = make_tagger_trainer(tmp_path / "b", seed=100 + n)   # other initial parameters and RNG state
        resumed.fit(make_batches, max_steps=stop, resume=True, evaluate=noisy_evaluate)
    assert uninterrupted.global_step == resumed.global_step == stops[-1]
    assert resumed.epoch >= 1   # the runs crossed an epoch boundary
    assert_same_training_state(uninterrupted, resumed)


def test_an_interrupted_run_saves_and_resumes_exactly(tmp_path, capsys):
    calls = 0

    def interrupted_at_step_7(model, batch):
        nonlocal calls
        calls += 1
        if calls == 7:
            raise KeyboardInterrupt
        return tagger_loss(model, batch)

    uninterrupted = make_tagger_trainer(tmp_path / "a")
    uninterrupted.fit(make_batches, max_steps=9)
    first = make_tagger_trainer(tmp_path / "b", loss_fn=interrupted_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        first.fit(make_batches, max_steps=9)
    assert "interrupted; saved" in capsys.readouterr().err
    resumed = make_tagger_trainer(tmp_path / "b", seed=5)
    resumed.fit(make_batches, max_steps=9, resume=True)
    assert_same_training_state(uninterrupted, resumed)


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, capsys):
    trainer = make_tagger_trainer(tmp_path)
    trainer.fit(make_batches, max_steps=2, resume=True)
    assert f"no checkpoint at {str(tmp_path / 'last.safetensors')!r}: starting fresh" in capsys.readouterr().err
    assert trainer.global_step == 2 and (tmp_path / "last.safetensors").exists()


def test_the_time_budget_counts_training_seconds_across_resumes(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("time.perf_counter", lambda: clock[0])

    def one_second_per_step(model, batch):
        clock[0] += 1.0
        return tagger_loss(model, batch)

    trainer = make_tagger_trainer(tmp_path, loss_fn=one_second_per_step)
    history = trainer.fit(make_batches, time_budget=2.5)
    assert trainer.global_step == 4          # the step started at 3 s was the last one
    assert [(h["epoch"], h["complete"]) for h in history] == [(0, False)]
    with safe_open(str(tmp_path / "last.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["trainer/position"])["elapsed_seconds"] == 4.0

    resumed = make_tagger_trainer(tmp_path, loss_fn=one_second_per_step)
    resumed.fit(make_batches, time_budget=2.5, resume=True)
    assert resumed.global_step == 4          # the budget was spent before
    resumed.fit(make_batches, time_budget=5.5)
    assert resumed.global_step == 7 and [h["complete"] for h in resumed.history] == [True, False]


# -- errors ----------------------------------------------------------------------------------------

def trained(directory=None, **options):
    trainer = make_tagger_trainer(directory, **options)
    trainer.fit(make_batches, max_steps=2)
    return trainer


def assert_resume_fails_and_changes_nothing(trainer, message):
    before = snapshot(trainer)
    with pytest.raises(CheckpointError, match=message):
        trainer.fit(make_batches, max_steps=20, resume=True)
    after = snapshot(trainer)
    assert after["position"] == before["position"]
    for name, value in before["model"].items():
        assert torch.equal(value, after["model"][name]), name
    assert_same_optimizer_state(before["optimizer"], after["optimizer"])


def test_resume_from_a_truncated_checkpoint_fails_and_changes_nothing(tmp_path):
    trainer = trained(tmp_path)
    data = (tmp_path / "last.safetensors").read_bytes()
    (tmp_path / "last.safetensors").write_bytes(data[:len(data) // 2])
    assert_resume_fails_and_changes_nothing(trainer, "cannot read the checkpoint")


def test_resume_into_a_model_of_other_shapes_fails_and_changes_nothing(tmp_path):
    trained(tmp_path, hidden=8)
    narrow = trained(tmp_path / "b", hidden=6)
    narrow.checkpoint_dir = str(tmp_path)
    assert_resume_fails_and_changes_nothing(
        narrow, r"mis-shaped: emb.weight: the checkpoint has \(7, 8\), the model \(7, 6\)")


def test_resume_with_another_model_fails_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 3))
    trainer = Trainer(mlp, tagger_loss, torch.optim.Adam(mlp.parameters()), checkpoint_dir=tmp_path, progress=False)
    trainer.fit(make_batches, max_steps=1)
    tagger = trained(tmp_path / "b")
    tagger.checkpoint_dir = str(tmp_path)
    assert_resume_fails_and_changes_nothing(tagger, r"(?s)missing: emb.weight.*unexpected: 0.weight")


def test_resume_with_another_optimizer_or_scheduler_fails_and_changes_nothing(tmp_path):
    trained(tmp_path, optimizer="adam", scheduler=True)
    sgd = trained(tmp_path / "b", optimizer="sgd", scheduler=False)
    sgd.checkpoint_dir = str(tmp_path)
    assert_resume_fails_and_changes_nothing(
        sgd, r"(?s)optimizer: the checkpoint's is torch.optim.adam.Adam, this one is torch.optim.sgd.SGD"
             r".*scheduler: the checkpoint's is torch.optim.lr_scheduler.LambdaLR, this one is None")


def test_resume_from_a_model_only_file_fails(tmp_path):
    trainer = trained(tmp_path / "b", seed=1)
    ll.save(trainer.model, tmp_path / "last.safetensors")
    trainer.checkpoint_dir = str(tmp_path)
    assert_resume_fails_and_changes_nothing(trainer, "not a training checkpoint")


def test_resume_with_changed_data_fails(tmp_path):
    trained(tmp_path)   # stopped at step 2 of 5 in epoch 0
    trainer = make_tagger_trainer(tmp_path)
    message = r"stopped at step 2 of epoch 0, which had 5 batches, but make_batches\(0\) now gives 4"
    with pytest.raises(ValueError, match=message):
        trainer.fit(lambda epoch: make_batches(epoch)[:4], max_steps=20, resume=True)


def test_an_empty_dataset_is_an_error_before_any_step(tmp_path):
    trainer = make_tagger_trainer(tmp_path)
    before = snapshot(trainer)
    with pytest.raises(ValueError, match="no batches: the dataset is empty"):
        trainer.fit(lambda epoch: [], epochs=1)
    assert trainer.global_step == 0 and os.listdir(tmp_path) == []
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before["model"].items())


def test_bad_arguments_are_rejected():
    trainer = make_tagger_trainer()
    with pytest.raises(ValueError, match="needs epochs, max_steps or time_budget"):
        trainer.fit(make_batches)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        trainer.fit(make_batches, epochs=1, resume=True)
    model = Tagger()
    with pytest.raises(ValueError, match="trainer's own"):
        Trainer(model, tagger_loss, torch.optim.SGD(model.parameters(), lr=0.1), metadata={"trainer/x": "1"})
    with pytest.raises(ValueError, match="not parameters of the model"):
        Trainer(model, tagger_loss, torch.optim.SGD([*model.parameters(), torch.nn.Parameter(torch.zeros(2))], lr=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        Trainer(model, tagger_loss, opt, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))


# -- data parallel -------------------------------------------------------------------------------

TIME, FEAT, CLASSES = ll.Dim("time"), ll.Dim("feat", 4), ll.Dim("classes", 3)
FRAMES = [(torch.randn(t, 4, generator=torch.Generator().manual_seed(t)), torch.arange(t) % 3)
          for t in (1, 5, 2, 6, 3, 4, 2, 5)]


class FrameClassifier(ll.Module):
    """A looplift model, trained through a compiled program that uses its parameters."""

    def __init__(self):
        super().__init__()
        self.norm = ll.nn.LayerNorm(FEAT)
        self.out = ll.nn.Linear(FEAT, CLASSES)

    def forward(self, x, labels):
        loss = ll.cross_entropy(self.out(self.norm(x)), labels, axis=CLASSES)
        return ll.sum(loss, axis=[ll.batch_dim, TIME])


def frame_trainer(world_size=1, rank=0):
    model = FrameClassifier()
    program = ll.compile(model, mode="train")

    def loss_fn(model, batch):
        x, labels, lengths = batch
        named_x = ll.Named(x, (ll.batch_dim, TIME, FEAT), lengths={TIME: lengths})
        return program(named_x, ll.Named(labels, (ll.batch_dim, TIME), sparse_dim=CLASSES)).tensor, int(lengths.sum())

    def batches(epoch):
        out = []
        for b in bucketed_batches([len(y) for _, y in FRAMES], batch_size=4, seed=3, epoch=epoch,
                                  world_size=world_size, rank=rank):
            width = max(len(FRAMES[i][1]) for i in b)
            out.append((torch.stack([F.pad(FRAMES[i][0], (0, 0, 0, width - len(FRAMES[i][1]))) for i in b]),
                        torch.stack([F.pad(FRAMES[i][1], (0, width - len(FRAMES[i][1]))) for i in b]),
                        torch.tensor([len(FRAMES[i][1]) for i in b])))
        return out

    return Trainer(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.5), progress=False), batches


def ddp_worker(out_dir):
    """One rank of the data-parallel test; run with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set."""
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    checkpoints = os.path.join(out_dir, "checkpoints")
    first = make_tagger_trainer(checkpoints, seed=10 + rank, dropout=0.0, clip_norm=0.05)  # DDP makes rank 0's init
    assert first.world_size == 2 and first.rank == rank

    def shard(epoch):
        return make_batches(epoch, world_size=first.world_size, rank=first.rank)

    first.fit(shard, max_steps=3)
    resumed = make_tagger_trainer(checkpoints, seed=20 + rank, dropout=0.0, clip_norm=0.05)
    resumed.fit(shard, max_steps=7, resume=True)

    torch.manual_seed(10)
    frames, frame_batches = frame_trainer(world_size=2, rank=rank)
    frames.fit(frame_batches, max_steps=3)
    torch.save({"tagger": resumed.model.state_dict(), "frames": frames.model.state_dict(),
                "counts": [int((labels != PAD).sum()) for _, labels in shard(0)]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # Exit without freeing the process group: torch can deadlock freeing a gloo group (held by each DDP
    # object) while its worker thread waits for the GIL (pytorch/pytorch#56297); this test saw it once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_on_the_combined_batches(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_train_driver as t; " \
           f"t.ddp_worker({str(tmp_path)!r})"
    ranks = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()   # no-op for a process that ended
    assert [p.returncode for p in ranks] == [0, 0], "\n".join(outputs)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["counts"] != results[1]["counts"]   # unequal shards: a per-rank mean would be wrong

    single = make_tagger_trainer(seed=10, dropout=0.0, clip_norm=0.05)
    single.fit(make_batches, max_steps=7)
    torch.manual_seed(10)
    frames, frame_batches = frame_trainer()
    frames.fit(frame_batches, max_steps=3)
    for key, model in (("tagger", single.model), ("frames", frames.model)):
        for name, value in model.state_dict().items():
            assert torch.equal(results[0][key][name], results[1][key][name]), (key, name)
            torch.testing.assert_close(results[0][key][name], value, rtol=1e-6, atol=1e-6, msg=f"{key} {name}")

    with safe_open(str(tmp_path / "checkpoints" / "last.safetensors"), framework="pt") as f:
        assert {"trainer/rng/0/torch", "trainer/rng/1/torch"} <= set(f.keys())
        assert json.loads(f.metadata()["trainer/position"])["world_size"] == 2
        for name, value in results[0]["tagger"].items():
            assert torch.equal(f.get_tensor(name), value), name


# -- budget_done: the fraction of the budget behind the run, for schedules over the whole run ------------

def _record_progress(trainer):
    """The trainer's budget_done as its scheduler sees it, step by step."""
    seen = []
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, lambda step: seen.append(trainer.budget_done) or 1.0)
    seen.clear()   # (the scheduler's first call, at construction)
    return seen


def test_budget_done_counts_steps_of_max_steps_and_of_epochs():
    trainer = make_tagger_trainer(scheduler=False)
    seen = _record_progress(trainer)
    trainer.fit(make_batches, max_steps=7)
    assert seen == pytest.approx([k / 7 for k in range(1, 8)])

    trainer = make_tagger_trainer(scheduler=False)
    seen = _record_progress(trainer)
    trainer.fit(make_batches, epochs=2)                  # 5 batches per epoch
    assert seen == pytest.approx([k / 10 for k in range(1, 11)])

    trainer = make_tagger_trainer(scheduler=False)      # both: whichever is further along
    seen = _record_progress(trainer)
    trainer.fit(make_batches, epochs=4, max_steps=8)
    assert seen == pytest.approx([k / 8 for k in range(1, 9)])


def test_budget_done_counts_the_time_of_a_time_budget_across_a_resume(tmp_path, monkeypatch):
    """A clock that moves 1 s per step: budget_done after a step is the time at its start over the budget, and a
    resumed run goes on from the time the first one spent."""
    import looplift.train.driver as driver
    now = [1000.0]
    monkeypatch.setattr(driver.time, "perf_counter", lambda: now[0])

    def slow_loss(model, batch):
        now[0] += 1.0
        return tagger_loss(model, batch)

    first = make_tagger_trainer(str(tmp_path), scheduler=False, loss_fn=slow_loss)
    seen = _record_progress(first)
    first.fit(make_batches, time_budget=3.0)
    # steps start at 0, 1, 2 and 3 s; the one that starts at 3 s is the last
    assert seen == pytest.approx([0 / 3, 1 / 3, 2 / 3, 3 / 3]) and first.global_step == 4

    second = make_tagger_trainer(str(tmp_path), scheduler=False, loss_fn=slow_loss)
    seen = _record_progress(second)
    second.fit(make_batches, time_budget=8.0, resume=True)
    # resumed at 4 s of 8: steps start at 4, 5, 6, 7 and 8 s; the one that starts at 8 s is the last
    assert seen == pytest.approx([4 / 8, 5 / 8, 6 / 8, 7 / 8, 1.0])
    assert second.global_step == 9


def test_progress_epochs_prints_a_line_per_epoch_and_no_bar(capsys):
    trainer = make_tagger_trainer(progress="epochs")
    trainer.fit(make_batches, epochs=3)
    err = capsys.readouterr().err
    assert [line.split(":")[0] for line in err.splitlines()] == ["epoch 0", "epoch 1", "epoch 2"]
    assert "step/s" not in err and "|" not in err
