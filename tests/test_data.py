import argparse
import json
import random

import numpy as np
import pytest

from sparkformer import corpora, data
from sparkformer.data import BatchSampler, TokenData, eval_windows, prepare
from sparkformer.tokenizer import check_vocab, load_tokenizer, train_bpe

WORDS = ("the king queen sword crown castle night day love death war peace def return class import self "
         "for while if else print value list dict").split()


def make_corpus(root, n_docs=12, seed=0):
    """Two domains as folders: drama/*.txt and code/*.txt, ~1-2 KB per document."""
    rng = random.Random(seed)
    for domain in ("drama", "code"):
        (root / domain).mkdir(parents=True, exist_ok=True)
        for i in range(n_docs):
            words = [rng.choice(WORDS[:12] if domain == "drama" else WORDS[12:]) for _ in range(rng.randint(200, 400))]
            (root / domain / f"{i:03d}.txt").write_text(" ".join(words) + "\n")
    return [str(root / "drama"), str(root / "code")]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKFORMER_CACHE", str(tmp_path / "cache"))
    corpora._MEMO.clear()


@pytest.fixture
def prepared(tmp_path):
    sources = make_corpus(tmp_path / "corpus")
    out = prepare(sources, out=tmp_path / "data", vocab_size=300, val_fraction=0.2, quiet=True)
    return out, sources


def test_prepare_writes_manifest_and_token_files(prepared):
    out, sources = prepared
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] <= 300 and m["eos_id"] == 0
    assert set(m["splits"]["train"]) == {"drama", "code"} and set(m["splits"]["val"]) == {"drama", "code"}
    assert [s["name"] for s in m["sources"]] == sources
    assert data.verify(out, quiet=True)
    td = TokenData(out)
    tok = td.tokenizer()
    assert tok.sha256 == m["tokenizer_sha256"]
    # token files decode back to the documents, each followed by EOS
    docs = corpora.split_documents(corpora.load_documents(sources[0]), 0.2)["val"]
    ids = np.asarray(td.tokens("val", "drama"))
    assert len(ids) == m["splits"]["val"]["drama"]["tokens"] and ids.dtype == np.uint16
    pieces = np.split(ids, np.flatnonzero(ids == tok.eos_id) + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == [d.text for d in docs]


def test_prepare_reuses_and_rebuilds(prepared, tmp_path, capsys):
    out, sources = prepared
    stamp = (out / "train.drama.bin").stat().st_mtime_ns
    assert prepare(sources, out=out, vocab_size=300, val_fraction=0.2) == out
    assert "reusing" in capsys.readouterr().err
    assert (out / "train.drama.bin").stat().st_mtime_ns == stamp
    # corrupted files are noticed and rebuilt
    (out / "train.drama.bin").write_bytes(b"\0\0")
    prepare(sources, out=out, vocab_size=300, val_fraction=0.2, quiet=True)
    assert data.verify(out, quiet=True)
    # other settings -> rebuild
    prepare(sources, out=out, vocab_size=280, val_fraction=0.2, quiet=True)
    assert TokenData(out).vocab_size <= 280


def test_prepare_with_existing_tokenizer(prepared, tmp_path):
    out, sources = prepared
    out2 = prepare(sources[:1], out=tmp_path / "data2", tokenizer=out / "tokenizer.json", quiet=True)
    assert TokenData(out2).manifest["tokenizer_sha256"] == TokenData(out).manifest["tokenizer_sha256"]
    # an HF-style folder with tokenizer.json + tokenizer_config.json naming the eos token
    hf = tmp_path / "hf_tok"
    hf.mkdir()
    (hf / "tokenizer.json").write_text((out / "tokenizer.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    tok = load_tokenizer(hf)
    assert tok.eos_id == 0 and tok.decode(tok.encode("the king")) == "the king"


def test_vocab_mismatch_is_clear(prepared):
    out, _ = prepared
    td = TokenData(out)
    with pytest.raises(ValueError, match=rf"model has vocab_size=8192 but the tokenizer has {td.vocab_size}"):
        td.check_model_vocab(8192)
    td.check_model_vocab(td.vocab_size)
    check_vocab(5, 5)


def test_dtype_and_tokenizer_roundtrip():
    assert data._dtype_for(65535) == np.uint16 and data._dtype_for(65536) == np.uint32
    tok = train_bpe(["hello world, héllo wörld 🙂"] * 20, vocab_size=270)
    text = "héllo 🙂 unseen ✓ bytes"
    assert tok.decode(tok.encode(text)) == text  # byte-level: nothing is unknown
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["x"], vocab_size=100)


def test_batches_are_a_function_of_seed_and_step(prepared):
    out, _ = prepared
    td = TokenData(out)
    s = BatchSampler(td, seq_len=16, batch_size=8, seed=3)
    x1, y1 = s.batch(5)
    x2, y2 = BatchSampler(TokenData(out), seq_len=16, batch_size=8, seed=3).batch(5)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (8, 16) and x1.dtype == np.int64
    assert np.array_equal(x1[:, 1:], y1[:, :-1])  # next-token targets
    assert not np.array_equal(s.batch(6)[0], x1)
    assert not np.array_equal(BatchSampler(td, 16, 8, seed=4).batch(5)[0], x1)
    # a rank's rows are exactly its slice of the global batch
    xr, yr = s.batch(5, rows=slice(2, 4))
    assert np.array_equal(xr, x1[2:4]) and np.array_equal(yr, y1[2:4])
    # both domains are drawn over a few steps
    doms = np.concatenate([s.starts(i)[0] for i in range(10)])
    assert set(doms.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="seq_len=100000 is too long"):
        BatchSampler(td, seq_len=100000, batch_size=2)


def test_eval_windows():
    toks = np.arange(100)
    w = eval_windows(toks, 10)
    assert w.tolist() == list(range(0, 90, 10))
    assert eval_windows(toks, 10, count=3).tolist() == [0, 44, 89]
    assert len(eval_windows(toks[:5], 10)) == 0


def test_missing_data_dir_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="sparkformer data prepare"):
        TokenData(tmp_path / "nothing")


def test_cli_prepare(tmp_path, capsys):
    sources = make_corpus(tmp_path / "corpus", n_docs=4)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    data.add_cli(sub)
    args = parser.parse_args(["data", "prepare", "--sources", ",".join(sources), "--out", str(tmp_path / "d"),
                              "--vocab-size", "280"])
    assert args.func(args) == 0
    outp = capsys.readouterr().out
    assert "train  drama" in outp and str(tmp_path / "d") in outp
    args = parser.parse_args(["data", "info", str(tmp_path / "d")])
    assert args.func(args) == 0
