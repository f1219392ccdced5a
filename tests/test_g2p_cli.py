"""The G2P recipe end to end, tiny (a few hundred words, small sizes, seconds): train, checkpoint, resume,
eval, convert through ``looplift-g2p``; and its errors: unknown characters, corrupt or mismatched
checkpoints, an empty dataset, with nothing written half."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from looplift.recipes.g2p import cli, data, recipe
from looplift.recipes.g2p.model import G2P, Config
from looplift.recipes.g2p.transducer import TransducerG2P
from looplift.recipes.g2p.transformer import TransformerG2P

TINY = ["--words", "120", "--emb", "8", "--enc", "16", "--dec", "16", "--batch", "32", "--eval-words", "16",
        "--minutes", "0", "--no-progress", "--seed", "3"]
EPOCHS = ["--lr-schedule", "epochs"]


def run(capsys, *argv):
    cli.main(list(argv))
    return capsys.readouterr()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained 1 epoch, then resumed for a second (on the per-epoch schedule: the cosine one spans the
    budget of each call)."""
    d = str(tmp_path_factory.mktemp("g2p"))
    cli.main(["train", "--dir", d, "--epochs", "1", *TINY, *EPOCHS])
    first = {n: p.clone() for n, p in recipe.load_model(d, which="last")[0].named_parameters()}
    cli.main(["train", "--dir", d, "--epochs", "2", "--resume", *TINY, *EPOCHS])
    return d, first


def test_train_writes_the_model_and_resume_continues(trained):
    d, first = trained
    assert sorted(f for f in os.listdir(d) if not f.startswith(".")) == ["best.safetensors", "last.safetensors",
                                                                          "model.safetensors"]
    model, vocabs = recipe.load_model(d, which="last")
    assert len(vocabs.phonemes) == 40 and not vocabs.stress
    assert model.config == Config(len(vocabs.chars), 40, emb=8, enc=16, enc_layers=2, dec=16, dropout=0.1,
                                  label_smoothing=0.1)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, first[n])]
    assert changed, "the resumed second epoch changed nothing"


def test_eval_and_convert_use_the_best_model_unless_told_otherwise(trained, monkeypatch, capsys):
    """best.safetensors is the model of the best dev WER (its metadata says which); eval and convert read it by
    default and model.safetensors with --checkpoint last."""
    d, _ = trained
    with safe_open(os.path.join(d, "best.safetensors"), framework="pt") as f:
        best = json.loads(f.metadata()["best"])
        best_tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert best["result"] == "dev_wer" and best["epoch"] in (0, 1)
    model, _ = recipe.load_model(d)
    assert all(torch.equal(p, best_tensors[n]) for n, p in model.named_parameters())
    asked = []
    real = recipe.load_model
    monkeypatch.setattr(recipe, "load_model", lambda path, which: asked.append(which) or real(path, which=which))
    run(capsys, "convert", "--dir", d, "hello")
    run(capsys, "eval", "--dir", d, "--limit", "3", "--checkpoint", "last")
    assert asked == ["best", "last"]


def test_average_keeps_the_mean_of_the_last_epochs_models_and_eval_reads_it(tmp_path, capsys):
    """``train --average 2``: average.safetensors is the mean of the models at the ends of the last two of three
    epochs (kept in epochs/), with the model's metadata; ``eval --checkpoint average`` decodes with it, and a
    run trained without --average has none (an error, not another model)."""
    d = str(tmp_path / "avg")
    cli.main(["train", "--dir", d, "--epochs", "3", "--average", "2", *TINY, *EPOCHS])
    assert sorted(os.listdir(os.path.join(d, "epochs"))) == ["epoch-1.safetensors", "epoch-2.safetensors"]
    ends = [load_file(os.path.join(d, "epochs", f"epoch-{e}.safetensors")) for e in (1, 2)]
    average, vocabs = recipe.load_model(d, which="average")
    last, _ = recipe.load_model(d, which="last")
    for name, p in average.named_parameters():
        torch.testing.assert_close(p, (ends[0][name].double() + ends[1][name].double()).div(2).float(),
                                   rtol=0, atol=1e-7)
        assert torch.equal(ends[1][name], dict(last.named_parameters())[name])
    assert any(not torch.equal(p, dict(last.named_parameters())[n]) for n, p in average.named_parameters())
    words = [vocabs.chars.encode(w) for w in ("hello", "world", "phoneme")]
    want = recipe.decode(average, words)
    capsys.readouterr()   # (the training's lines)
    out = run(capsys, "convert", "--dir", d, "--checkpoint", "average", "--nbest", "1", "hello", "world", "phoneme")
    assert [re.match(r"^\S+\s+\S+\s+p=\S+\s*(.*)$", line)[1].split() for line in out.out.strip().splitlines()] == \
        [vocabs.phonemes.decode(hyps[0][0]) for hyps in want]
    plain = str(tmp_path / "plain")
    cli.main(["train", "--dir", plain, "--epochs", "1", *TINY, *EPOCHS])
    with pytest.raises(SystemExit):
        cli.main(["eval", "--dir", plain, "--checkpoint", "average", "--limit", "3"])
    assert "kept no average model: train it with --average K" in capsys.readouterr().err


def test_resumed_run_equals_an_uninterrupted_one(trained, tmp_path):
    d, _ = trained
    cli.main(["train", "--dir", str(tmp_path), "--epochs", "2", *TINY, *EPOCHS])
    resumed, _ = recipe.load_model(d, which="last")
    straight, _ = recipe.load_model(tmp_path, which="last")
    for (n, a), (_, b) in zip(resumed.named_parameters(), straight.named_parameters()):
        assert torch.equal(a, b), n


def test_eval_prints_the_error_rates_of_the_model(trained, capsys):
    d, _ = trained
    out = run(capsys, "eval", "--dir", d, "--split", "dev", "--limit", "20", "--beam", "2").out
    m = re.search(r"dev: 20 words, beam 2: PER ([\d.]+)% \((\d+)/(\d+) phonemes\), WER ([\d.]+)% \((\d+) words", out)
    assert m, out
    model, vocabs = recipe.load_model(d)
    want = recipe.evaluate(model, data.split(data.load())["dev"][:20], vocabs, beam=2)
    assert (int(m[2]), int(m[3]), int(m[5])) == (want.phoneme_errors, want.phonemes, want.word_errors)
    assert float(m[1]) == pytest.approx(100 * want.per, abs=0.006)
    # (batches of 4 words searched side by side by 3 workers: the same counts)
    side = run(capsys, "eval", "--dir", d, "--split", "dev", "--limit", "20", "--beam", "2", "--batch", "4",
               "--workers", "3").out
    assert re.search(r"dev: 20 words, beam 2: PER [\d.]+% \((\d+)/(\d+) phonemes\), WER [\d.]+% \((\d+) words",
                     side).groups() == (m[2], m[3], m[5]), side


def test_eval_and_convert_keep_freed_memory_for_the_next_tensors(trained, monkeypatch, capsys):
    """The command line makes the process reuse freed CPU memory (``looplift.reuse_freed_memory``) before any
    work: a search step's large tensors then take the last step's memory, not fresh pages."""
    d, _ = trained
    calls = []
    monkeypatch.setattr(cli.ll, "reuse_freed_memory", lambda: calls.append("reuse") or True)
    run(capsys, "eval", "--dir", d, "--split", "dev", "--limit", "4", "--beam", "1")
    run(capsys, "convert", "--dir", d, "hello", "--beam", "1")
    assert calls == ["reuse", "reuse"]


def test_convert_prints_nbest_with_scores(trained, capsys):
    d, _ = trained
    out = run(capsys, "convert", "--dir", d, "Hello", "world", "--beam", "3", "--nbest", "3").out
    lines = out.strip().splitlines()
    assert lines[0].startswith("hello ")
    words = [ln for ln in lines if not ln.startswith(" ")]
    assert [w.split()[0] for w in words] == ["hello", "world"]
    model, vocabs = recipe.load_model(d)
    nbest = recipe.decode(model, [vocabs.chars.encode("hello")], beam=3)[0]
    assert len(nbest) == 3
    for rank, (line, (ids, score)) in enumerate(zip(lines, nbest)):
        m = re.match(r"^(\S*)\s+(-?\d+\.\d+)\s+p=(\S+)\s+(.*)$", line)
        assert m and m[1] == ("hello" if rank == 0 else ""), line
        assert float(m[2]) == pytest.approx(score, abs=1e-3)
        assert m[4].split() == vocabs.phonemes.decode(ids)
    scores = [s for _, s in nbest]
    assert scores == sorted(scores, reverse=True)


def test_threshold_in_eval_and_convert(trained, capsys):
    """``--threshold``: eval prints the counts of ``recipe.evaluate(threshold=...)``; convert prints the
    hypotheses ``recipe.decode(threshold=...)`` keeps (threshold 0: only the best); a negative one is an
    error before anything is decoded."""
    d, _ = trained
    out = run(capsys, "eval", "--dir", d, "--limit", "20", "--beam", "3", "--threshold", "0.5").out
    m = re.search(r"PER (\S+)% \((\d+)/(\d+) phonemes\), WER (\S+)% \((\d+) words", out)
    assert m and "threshold 0.5" in out, out
    model, vocabs = recipe.load_model(d)
    want = recipe.evaluate(model, data.split(data.load())["dev"][:20], vocabs, beam=3, threshold=0.5)
    assert (int(m[2]), int(m[3]), int(m[5])) == (want.phoneme_errors, want.phonemes, want.word_errors)
    lines = run(capsys, "convert", "--dir", d, "hello", "--beam", "3", "--nbest", "3", "--threshold", "0").out
    best = recipe.decode(model, [vocabs.chars.encode("hello")], beam=1)[0]
    assert len(lines.strip().splitlines()) == len(best) == 1
    assert lines.split()[3:] == vocabs.phonemes.decode(best[0][0])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--dir", d, "hello", "--threshold", "-1"])
    assert e.value.code == 2 and "--threshold: must be >= 0, got -1" in capsys.readouterr().err


def test_unknown_characters_are_named(trained, capsys):
    d, _ = trained
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--dir", d, "café"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "'é'" in err and "café" in err


def test_corrupt_and_mismatched_checkpoints(trained, tmp_path, capsys):
    d, _ = trained
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        blob = f.read()
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--dir", str(bad)])
    assert e.value.code == 1
    assert "cannot read the checkpoint" in capsys.readouterr().err
    # the metadata says one size, the tensors are of another
    other = tmp_path / "mismatch"
    other.mkdir()
    model, vocabs = recipe.load_model(d)
    wrong = Config(**{**model.config.__dict__, "dec": 12})
    import looplift as ll
    ll.save(G2P(wrong), other / "model.safetensors", metadata=vocabs.metadata(model.config))
    with pytest.raises(SystemExit):
        cli.main(["convert", "--dir", str(other), "hello"])
    err = capsys.readouterr().err
    assert "does not match the model" in err and "mis-shaped: cell.weight_hh_l0" in err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--dir", str(tmp_path / "nothing-here")])
    assert "no G2P model" in capsys.readouterr().err


def test_empty_dataset_is_an_error_and_writes_nothing(tmp_path, capsys):
    d = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dir", str(d), *TINY, "--words", "0"])
    assert e.value.code == 2 and "--words: must be a positive integer, got 0" in capsys.readouterr().err
    assert not d.exists() or os.listdir(d) == []


def test_help_explains_every_option(capsys):
    for command in ("run", "train", "eval", "convert"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        for option in re.findall(r"^\s+(--[a-z-]+)", out, flags=re.M):
            line = next(ln for ln in out.splitlines() if ln.strip().startswith(option))
            block = out[out.index(line):].split("\n  -")[0]
            assert len(block.split(option, 1)[1].strip()) > 5, (command, option)


def _assert_eval_and_convert_agree_with_the_recipe(capsys, d, model, vocabs):
    """``eval`` prints the counts of recipe.evaluate; ``convert`` prints recipe.decode's best hypothesis."""
    out = run(capsys, "eval", "--dir", d, "--limit", "10", "--beam", "2").out
    m = re.search(r"PER ([\d.]+)% \((\d+)/(\d+) phonemes\), WER ([\d.]+)% \((\d+) words", out)
    want = recipe.evaluate(model, data.split(data.load())["dev"][:10], vocabs, beam=2)
    assert m and (int(m[2]), int(m[3]), int(m[5])) == (want.phoneme_errors, want.phonemes, want.word_errors)
    line = run(capsys, "convert", "--dir", d, "hello", "--nbest", "1").out.strip()
    best = recipe.decode(model, [vocabs.chars.encode("hello")], beam=5)[0][0]
    assert line.split()[3:] == vocabs.phonemes.decode(best[0]) and "<eos>" not in line


def test_transformer_arch_trains_resumes_evaluates_and_converts(tmp_path, capsys):
    """``--arch transformer``: the checkpoint records the architecture (load_model builds a TransformerG2P of
    the trained sizes); 1 epoch resumed to 2 equals 2 straight; eval prints the recipe's counts; convert
    prints the recipe's best hypothesis."""
    tiny = [*TINY, "--arch", "transformer", "--model-dim", "8", "--heads", "2", "--ff", "12", "--layers", "1", *EPOCHS]
    d, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    cli.main(["train", "--dir", d, "--epochs", "1", *tiny])
    cli.main(["train", "--dir", d, "--epochs", "2", "--resume", *tiny])
    cli.main(["train", "--dir", straight, "--epochs", "2", *tiny])
    capsys.readouterr()
    model, vocabs = recipe.load_model(d)
    assert isinstance(model, TransformerG2P) and (model.config.model, model.config.layers) == (8, 1)
    for (n, a), (_, b) in zip(model.named_parameters(), recipe.load_model(straight)[0].named_parameters()):
        assert torch.equal(a, b), n
    _assert_eval_and_convert_agree_with_the_recipe(capsys, d, model, vocabs)


def test_transducer_arch_trains_evaluates_and_converts(tmp_path, capsys, trained):
    """``--arch transducer``: full-sum training; the checkpoint records the architecture and its sizes (the
    prediction network is --dec); eval prints the recipe's counts; convert prints the best hypothesis,
    without blanks. ``--ensemble`` with itself evaluates and converts as the run alone; with an attention
    model, it is an error naming the transducer."""
    d = str(tmp_path / "rnnt")
    cli.main(["train", "--dir", d, "--epochs", "1", *TINY, "--arch", "transducer", "--joint", "12",
              "--max-labels", "2"])
    capsys.readouterr()
    model, vocabs = recipe.load_model(d)
    assert isinstance(model, TransducerG2P)
    assert (model.config.pred, model.config.joint, model.config.max_labels) == (16, 12, 2)
    _assert_eval_and_convert_agree_with_the_recipe(capsys, d, model, vocabs)
    alone = run(capsys, "eval", "--dir", d, "--limit", "20", "--beam", "3").out
    twice = run(capsys, "eval", "--dir", d, "--limit", "20", "--beam", "3", "--ensemble", d).out
    assert alone.split("; decoded")[0] == twice.split("; decoded")[0] and "WER" in alone
    alone = run(capsys, "convert", "--dir", d, "hello", "world", "--nbest", "3").out
    assert run(capsys, "convert", "--dir", d, "hello", "world", "--nbest", "3", "--ensemble", d).out == alone
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--dir", trained[0], "--limit", "5", "--ensemble", d])
    assert e.value.code == 2 and f"{d}: a transducer can be part of an ensemble of transducers only" in \
        capsys.readouterr().err


def test_a_stateless_transducer_trains_evaluates_and_joins_an_ensemble_of_transducers(tmp_path, capsys):
    """``--pred-context 2``: the prediction network reads the last two phonemes (recorded in the checkpoint);
    eval and convert print the recipe's results; it decodes in an ensemble with an LSTM transducer."""
    d, lstm = str(tmp_path / "stateless"), str(tmp_path / "lstm")
    cli.main(["train", "--dir", d, "--epochs", "1", *TINY, "--arch", "transducer", "--pred-context", "2"])
    cli.main(["train", "--dir", lstm, "--epochs", "1", *TINY, "--arch", "transducer"])
    capsys.readouterr()
    model, vocabs = recipe.load_model(d)
    assert model.config.pred_context == 2 and not hasattr(model, "pred")
    _assert_eval_and_convert_agree_with_the_recipe(capsys, d, model, vocabs)
    out = run(capsys, "eval", "--dir", d, "--limit", "20", "--beam", "3", "--ensemble", lstm).out
    assert "WER" in out


def test_an_ensemble_of_a_run_with_itself_evaluates_and_converts_as_the_run(trained, capsys):
    """``--ensemble DIR`` adds models to the search; the run's own model twice gives the same error rates and
    the same n-best as the model alone."""
    d, _ = trained
    alone = run(capsys, "eval", "--dir", d, "--limit", "20", "--beam", "3").out
    twice = run(capsys, "eval", "--dir", d, "--limit", "20", "--beam", "3", "--ensemble", d).out
    assert alone.split("; decoded")[0] == twice.split("; decoded")[0] and "WER" in alone
    alone = run(capsys, "convert", "--dir", d, "hello", "world", "--nbest", "3").out
    assert run(capsys, "convert", "--dir", d, "hello", "world", "--nbest", "3", "--ensemble", d).out == alone


def test_cosine_schedule_warms_up_then_falls_to_zero_at_the_end_of_the_budget():
    import argparse
    done = [0.0]
    factor = cli._schedule(argparse.Namespace(lr_schedule="cosine", warmup=0.1, lr_decay=0.9), lambda: done[0], 10)
    assert factor(0) == pytest.approx(1e-3)
    for progress, expected in [(0.05, 0.5), (0.1, 1.0), (0.55, 0.5), (1.0, 0.0)]:
        done[0] = progress
        assert factor(7) == pytest.approx(expected, abs=1e-12)
    epochs = cli._schedule(argparse.Namespace(lr_schedule="epochs", warmup=0.1, lr_decay=0.9), lambda: 1 / 0, 10)
    assert epochs(0) == 1.0 and epochs(5) == pytest.approx(0.9 ** 0.5) and epochs(20) == pytest.approx(0.81)


def test_a_run_on_the_cosine_schedule_ends_with_a_learning_rate_of_zero(tmp_path):
    d = str(tmp_path / "cos")
    cli.main(["train", "--dir", d, "--epochs", "2", "--lr-schedule", "cosine", *TINY])
    with safe_open(os.path.join(d, "last.safetensors"), framework="pt") as f:
        scheduler = json.loads(f.metadata()["trainer/scheduler"])
    assert dict(scheduler["state"]["dict"])["_last_lr"] == [0.0]   # (the checkpoint's encoding of a dict)


def test_a_run_interrupted_and_resumed_on_the_cosine_schedule_equals_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                                           capsys):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    cli.main(["train", "--dir", straight, "--epochs", "2", *TINY])
    make_loss = recipe.loss_function

    def interrupting(examples):
        loss_fn, steps = make_loss(examples), [0]

        def loss(model, batch):
            steps[0] += 1
            if steps[0] == 6:   # (in the second epoch)
                raise KeyboardInterrupt
            return loss_fn(model, batch)
        return loss

    monkeypatch.setattr(recipe, "loss_function", interrupting)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dir", interrupted, "--epochs", "2", *TINY])
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(recipe, "loss_function", make_loss)
    cli.main(["train", "--dir", interrupted, "--epochs", "2", "--resume", *TINY])
    a, _ = recipe.load_model(straight, which="last")
    b, _ = recipe.load_model(interrupted, which="last")
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n


def test_members_train_side_by_side_as_the_runs_of_their_seeds_and_decode_as_an_ensemble(tmp_path, capfd,
                                                                                          monkeypatch):
    """``train --members 2``: two processes, one thread each, seeds --seed and --seed + 1, into --dir/member-1
    and member-2, their lines prefixed by their names; each member's model is the one the plain run with its
    seed and one thread trains. eval and convert on --dir decode with both, as ``--ensemble`` of the second
    member's run does. Training the folder as one run, resuming with another count, or --members under torchrun
    is an error."""
    d, alone = str(tmp_path / "pair"), str(tmp_path / "alone")
    cli.main(["train", "--dir", d, "--members", "2", "--epochs", "1", *TINY, "--arch", "transducer"])
    out = capfd.readouterr()
    lines = (out.out + out.err).splitlines()
    assert any(line.startswith("member-1: trained") for line in lines), lines
    assert any(line.startswith("member-2: trained") for line in lines), lines
    with open(os.path.join(d, "members.json")) as f:
        assert json.load(f) == {"members": ["member-1", "member-2"]}
    cli.main(["train", "--dir", alone, "--epochs", "1", *TINY, "--arch", "transducer", "--seed", "4",
              "--threads", "1"])
    capfd.readouterr()
    first, _ = recipe.load_model(os.path.join(d, "member-1"))
    second, _ = recipe.load_model(os.path.join(d, "member-2"))
    for (n, a), (_, b) in zip(second.named_parameters(), recipe.load_model(alone)[0].named_parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, c) for a, c in zip(second.parameters(), first.parameters()))

    def said(*argv):
        cli.main(list(argv))
        return capfd.readouterr().out

    m1, m2 = os.path.join(d, "member-1"), os.path.join(d, "member-2")
    both = said("eval", "--dir", d, "--limit", "20", "--beam", "3")
    pair = said("eval", "--dir", m1, "--limit", "20", "--beam", "3", "--ensemble", m2)
    assert both.split("; decoded")[0] == pair.split("; decoded")[0] and "WER" in both
    words = ["hello", "world"]
    converted = said("convert", "--dir", d, *words)
    assert converted == said("convert", "--dir", m1, *words, "--ensemble", m2)
    assert converted != said("convert", "--dir", m1, *words)   # (the ensemble, not the first member: other scores)
    for argv, message in [(["train", "--dir", d], "holds a run of several members"),
                          (["train", "--dir", d, "--members", "3", "--resume"], "has 2 members, not 3"),
                          (["train", "--dir", alone, "--members", "2"], "holds a run of one model"),
                          (["train", "--dir", str(tmp_path / "none"), "--members", "2", "--resume"],
                           "no run of members to resume")]:
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--epochs", "1", *TINY])
        assert e.value.code == 2 and message in capfd.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dir", str(tmp_path / "ddp"), "--members", "2", "--epochs", "1", *TINY])
    assert e.value.code == 2 and "without torchrun" in capfd.readouterr().err
