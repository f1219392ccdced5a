"""The helpers of ``benchmarks/g2p_peer.py`` (looplift's G2P vs Phonetisaurus): the training lexicon it writes,
how it reads the decoder's output, how it chooses the n-gram order; and ``_peer_venv.ensure_venv``'s torch
option. Nothing is installed or run here."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from looplift.recipes.g2p import data, metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))   # (g2p_peer imports its sibling _peer_venv)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def peer():
    return _load("g2p_peer")


def test_lexicon_has_a_line_per_pronunciation(peer):
    entries = [data.Entry("either", (("IY", "DH", "ER"), ("AY", "DH", "ER"))),
               data.Entry("o'neil", (("OW", "N", "IY", "L"),))]
    assert peer.lexicon_lines(entries) == ["either\tIY DH ER", "either\tAY DH ER", "o'neil\tOW N IY L"]


def test_lexicon_rejects_the_characters_phonetisaurus_reserves(peer):
    with pytest.raises(ValueError, match="reserves"):
        peer.lexicon_lines([data.Entry("a_b", (("EY",),))])


def test_hypotheses_follow_the_word_order_and_leave_missing_words_empty(peer):
    pairs = [["cat", ["K", "AE", "T"]], ["dog", ["D", "AO", "G"]], ["dog", ["D", "AA", "G"]]]   # (an n-best: the first)
    hyps, missing = peer.hypotheses(pairs, ["dog", "bird", "cat"])
    assert hyps == [["D", "AO", "G"], [], ["K", "AE", "T"]] and missing == 1
    s = metrics.score(hyps, [[("D", "AO", "G")], [("B", "ER", "D")], [("K", "AE", "T")]])
    assert s.word_errors == 1 and s.phoneme_errors == 3      # (the missing word: all its phonemes deleted)


def test_the_order_with_the_lowest_dev_wer_is_chosen_then_per_then_the_smaller(peer):
    def s(wer, per):
        return metrics.Scores(per=per, wer=wer, words=1, phoneme_errors=0, phonemes=1, word_errors=0)
    assert peer.choose_order({6: s(0.26, 0.06), 7: s(0.25, 0.07), 8: s(0.255, 0.05)}) == 7
    assert peer.choose_order({6: s(0.25, 0.06), 7: s(0.25, 0.05), 8: s(0.25, 0.05)}) == 7


@pytest.mark.parametrize("with_torch", [True, False])
def test_ensure_venv_uses_a_ready_venv_and_installs_torch_only_if_asked(tmp_path, monkeypatch, with_torch):
    venv_mod = _load("_peer_venv")
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    # the ready mark of a venv built with these arguments (with torch: the same as before the option existed)
    torch_req = "torch==" + torch.__version__.split("+")[0] if with_torch else None
    (venv / ".looplift-ready").write_text(json.dumps({"torch": torch_req, "installs": [["tool"]], "check": "pass"}))
    monkeypatch.setenv("LOOPLIFT_TEST_VENV", str(venv))
    monkeypatch.setattr(venv_mod, "run_quiet", lambda cmd: pytest.fail(f"ran {cmd}: the venv should be ready"))
    kwargs = {} if with_torch else {"torch": False}
    assert venv_mod.ensure_venv("t", "LOOPLIFT_TEST_VENV", "t", [["tool"]], "pass", **kwargs) == venv / "bin" / "python"
