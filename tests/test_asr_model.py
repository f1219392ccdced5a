"""The speech recipe's CTC recognizer: loss and gradients equal the reference interpreter's and plain PyTorch's
(``F.ctc_loss`` over the same encoder outputs); greedy decoding; the CLI end to end on a tiny run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import looplift as ll
from looplift.recipes.asr import recipe
from looplift.recipes.asr.model import (
    BLANK,
    CHARS,
    CTC,
    FRAMES,
    Attention,
    Config,
    Transducer,
    build,
    decode_text,
    encode_text,
    greedy,
)

TINY = Config(n_mels=12, conv=8, enc=8, enc_layers=1, dropout=0.0, emb=4, dec=6, joint=5, max_labels=3)


def tiny_batch(model: CTC, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.tensor([44, 23, 36])
    feats = torch.randn(3, 44, TINY.n_mels, generator=g, dtype=torch.float64)
    texts = ["hi there", "ok", "yes it is"]                  # (8, 2, 9 labels: 11, 6 and 9 frames are enough)
    ids = [encode_text(t) for t in texts]
    n = torch.tensor([len(i) for i in ids])
    y = torch.zeros(3, int(n.max()), dtype=torch.long)
    for row, i in enumerate(ids):
        y[row, :len(i)] = torch.tensor(i)
    return (ll.Named(feats, (ll.batch_dim, FRAMES, model.feat), {FRAMES: frames}),
            ll.Named(y, (ll.batch_dim, CHARS), {CHARS: n}, sparse_dim=model.labels), feats, frames, y, n)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_ctc_loss_and_gradients_equal_the_reference_and_plain_pytorch():
    torch.manual_seed(0)
    model = CTC(TINY).double()
    x, y, feats, frames, labels, n = tiny_batch(model)
    program = ll.compile(model, mode="train")
    loss = program(x, y).tensor
    got = grads(model, loss)
    ref = program.reference(x, y).tensor
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for name, g in grads(model, ref).items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=name)
    # plain PyTorch: the same encoder outputs (from the log-probs the program decodes with) into F.ctc_loss
    log_probs, enc_frames = ll.compile(model, mode="eval")(x)
    time = [d for d in log_probs.dims if d not in (ll.batch_dim, model.labels)][0]
    lp = log_probs.align(ll.batch_dim, time, model.labels)
    want = F.ctc_loss(lp.transpose(0, 1), labels, enc_frames.tensor, n, blank=BLANK, reduction="sum")
    assert enc_frames.tensor.tolist() == [11, 6, 9] and torch.isfinite(loss)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decoder", ["rnnt", "aed"])
def test_loss_and_gradients_equal_the_reference_interpreter(decoder):
    """The transducer's prediction loop and the attention decoder's loop, optimized, compute what the literal
    step-by-step loop computes: loss and every parameter's gradient."""
    torch.manual_seed(0)
    model = build(Config(**{**TINY.__dict__, "decoder": decoder})).double()
    x, _, feats, frames, labels, n = tiny_batch(model)
    y = recipe.transcripts(model, ["hi there", "ok", "yes it is"])
    assert y.tensor.shape[1] == 9 + (decoder == "aed")          # (the attention decoder's end symbol)
    program = ll.compile(model, mode="train")
    loss = program(x, y).tensor
    got = grads(model, loss)
    ref = program.reference(x, y).tensor
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for name, g in grads(model, ref).items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("cls", [Transducer, Attention])
def test_the_search_gives_transcripts_and_beam_1_is_the_greedy_best(cls):
    torch.manual_seed(1)
    model = cls(Config(**{**TINY.__dict__, "decoder": "rnnt" if cls is Transducer else "aed"})).double()
    x = tiny_batch(model)[0]
    search = ll.compile(model, mode="search")
    for beam in (1, 3):
        best = recipe._best_of_search(search(x, beam=beam))
        assert len(best) == 3 and all(all(0 < t < model.labels.size for t in ids) for ids in best)


def test_greedy_merges_repeats_and_drops_blanks():
    lp = torch.full((1, 7, 5), -10.0)
    for t, label in enumerate([0, 3, 3, 0, 3, 2, 2]):
        lp[0, t, label] = 0.0
    assert greedy(lp, torch.tensor([7])) == [[3, 3, 2]]
    assert greedy(lp, torch.tensor([3])) == [[3]]
    assert decode_text(encode_text("it's ok")) == "it's ok"


def test_the_cli_trains_evaluates_and_transcribes_a_wav_it_wrote(tmp_path, monkeypatch, capsys):
    pytest.importorskip("espeakng_loader")
    pytest.importorskip("chatterbot_corpus")
    from looplift.recipes.asr import cli
    from looplift.recipes.asr.synth import Synthesizer, write_wav
    monkeypatch.setenv("LOOPLIFT_CACHE", str(tmp_path / "cache"))
    reused = []   # (each command first makes the process reuse freed memory: looplift.reuse_freed_memory)
    monkeypatch.setattr(cli.ll, "reuse_freed_memory", lambda: reused.append(True) or True)
    run = str(tmp_path / "run")
    cli.main(["train", "--dir", run, "--sentences", "4", "--voices", "1", "--epochs", "2", "--batch", "2",
              "--eval-utterances", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert "training on" in out and "dev WER" in out
    cli.main(["eval", "--dir", run, "--split", "test", "--limit", "3", "--sentences", "4", "--beam", "2"])
    assert "test: 3 utterances" in capsys.readouterr().out
    assert reused == [True, True]
    wav = tmp_path / "hello.wav"
    write_wav(wav, Synthesizer().synthesize("hello there", voice="en-us"))
    cli.main(["transcribe", "--dir", run, str(wav)])
    (line,) = capsys.readouterr().out.splitlines()
    path, text = line.split("\t")                # (a 2-epoch model's words are not expected to be right)
    assert path == str(wav) and set(text) <= set(" 'abcdefghijklmnopqrstuvwxyz")
    png = tmp_path / "hello.png"
    cli.main(["picture", "--dir", run, "--wav", str(wav), "--out", str(png)])
    assert capsys.readouterr().out.startswith(f"{png}: {wav}, recognized {text!r}")
    assert png.read_bytes()[:4] == b"\x89PNG"
    cli.main(["picture", "--dir", run, "--sentences", "4", "--utterance", "1"])
    assert "test utterance 1, recognized" in capsys.readouterr().out
    assert (tmp_path / "run" / "utterance.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as e:
        cli.main(["picture", "--dir", run, "--sentences", "4", "--utterance", "99"])
    assert e.value.code == 2 and "--utterance 99: test has" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--dir", run, "--minutes", "-1"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("looplift-asr: error: argument --minutes")


def test_the_ctc_prefix_search_sums_every_alignment_of_a_prefix():
    """With a beam that keeps every hypothesis, the merged hypotheses of each label sequence hold, together,
    exactly its CTC probability (the sum over all its alignments, from F.ctc_loss); beam 1 is greedy."""
    labels, T = ll.Dim("labels", 3), ll.Dim("time")
    holder = type("Holder", (), {"labels": labels})()
    torch.manual_seed(3)
    lengths = torch.tensor([4, 3])
    lp = torch.log_softmax(torch.randn(2, 4, 3, dtype=torch.float64), -1)
    x = ll.Named(lp, (ll.batch_dim, T, labels), {T: lengths})
    search = ll.compile(lambda v, beam: CTC._search(holder, v, T, beam), mode="search")
    ys, scores, n, valid = search(x, 81)
    (beam,) = [d for d in valid.dims if d is not ll.batch_dim]
    (steps,) = [d for d in ys.dims if d not in (ll.batch_dim, beam)]
    ys, n = ys.align(ll.batch_dim, beam, steps), n.align(ll.batch_dim, beam)
    scores, valid = scores.align(ll.batch_dim, beam), valid.align(ll.batch_dim, beam)
    for row in range(2):
        by_prefix: dict[tuple, list[float]] = {}
        for k in range(valid.shape[1]):
            if valid[row, k]:
                prefix = tuple(t for t in ys[row, k, :int(n[row, k])].tolist() if t != BLANK)
                by_prefix.setdefault(prefix, []).append(float(scores[row, k]))
        assert len(by_prefix) > 3
        for prefix, parts in by_prefix.items():
            assert len(parts) <= 2                       # (ending in the blank, or in the prefix's last label)
            want = -F.ctc_loss(lp[row:row + 1, :int(lengths[row])].transpose(0, 1),
                               torch.tensor([prefix or [0]])[:, :len(prefix)], lengths[row:row + 1],
                               torch.tensor([len(prefix)]), blank=BLANK, reduction="sum")
            torch.testing.assert_close(torch.logsumexp(torch.tensor(parts, dtype=torch.float64), 0), want,
                                       rtol=1e-9, atol=1e-9)
    best = recipe._best_of_search(search(x, 1))
    assert best == greedy(lp, lengths)


def test_the_main_job_trains_reports_the_test_wer_and_draws_an_utterance(tmp_path, monkeypatch, capsys):
    """``looplift-asr run`` end to end on a tiny configuration: synthesis, training, the test WER, the picture."""
    pytest.importorskip("espeakng_loader")
    pytest.importorskip("chatterbot_corpus")
    pytest.importorskip("matplotlib")
    from looplift.recipes.asr import cli
    monkeypatch.setenv("LOOPLIFT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    cli.main(["run", "--dir", str(run), "--decoder", "rnnt", "--sentences", "3", "--voices", "1", "--minutes", "0",
              "--epochs", "1", "--batch", "2", "--eval-utterances", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert "training on" in out and "trained 2 steps" in out
    assert "test: 6 utterances (voices and sentences not trained on), rnnt, greedy: WER" in out
    assert f"{run / 'utterance.png'}: test utterance 0, recognized" in out
    assert (run / "utterance.png").read_bytes()[:4] == b"\x89PNG"
    assert {"best.safetensors", "model.safetensors", "last.safetensors"} <= {p.name for p in run.iterdir()}
