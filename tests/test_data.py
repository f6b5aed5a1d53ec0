import argparse
import json
import random
from pathlib import Path

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
    last = json.loads(outp.strip().splitlines()[-1])  # like every command: one JSON line at the end
    assert last["data_dir"] == str(tmp_path / "d") and last["train_tokens"] > 0 and last["domains"] == ["code", "drama"]
    args = parser.parse_args(["data", "info", str(tmp_path / "d")])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True


def test_refused_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    """Every argument is checked before anything is written; a failure half-way removes what it wrote."""
    from sparkformer.cli import main

    sources = ",".join(make_corpus(tmp_path / "corpus", n_docs=4))
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--sources", sources, "--out", str(tmp_path / "d0"), "--vocab-size", "0"])
    with pytest.raises(ValueError, match="vocab_size=0"):
        prepare(sources, out=tmp_path / "d1", vocab_size=0)
    with pytest.raises(ValueError, match="unknown text encoding"):
        prepare(sources, out=tmp_path / "d2", encoding="klingon")

    def boom(*a, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(data, "train_bpe", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(sources, out=tmp_path / "d3", vocab_size=280, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["corpus"]  # no d*, no temporary


def test_non_text_and_unsplittable_input_is_refused_at_prepare(tmp_path):
    """Binary input is refused (a folder's binary files skipped, counted); non-UTF-8 text needs --encoding; a split
    that would be empty is refused here, not discovered by training."""
    (tmp_path / "rnd.txt").write_bytes(random.Random(0).randbytes(5000))
    for src in ("/bin/ls", str(tmp_path / "rnd.txt")):
        if Path(src).exists():
            with pytest.raises(ValueError, match="binary file"):
                prepare(src, out=tmp_path / "d", quiet=True)
    (tmp_path / "one.txt").write_text("the king and the queen\n" * 50)
    with pytest.raises(ValueError, match="no validation documents.*--val-fraction 0"):
        prepare(str(tmp_path / "one.txt"), out=tmp_path / "d", vocab_size=280, quiet=True)
    assert not (tmp_path / "d").exists()
    out = prepare(str(tmp_path / "one.txt"), out=tmp_path / "d", vocab_size=280, val_fraction=0, quiet=True)
    assert TokenData(out).domains("val") == []  # asked for: no validation split
    lat = tmp_path / "latin"
    lat.mkdir()
    for i in range(4):
        (lat / f"{i}.txt").write_bytes(f"caf\xe9 cr\xe8me br\xfbl\xe9e {i}\n".encode("latin-1") * 20)
    (lat / "x.txt").write_bytes(b"\x7fELF\0\0\1" * 100)
    with pytest.raises(ValueError, match=r"0.txt: not utf-8 text \(byte 0xe9 at offset 3\).*--encoding"):
        prepare(str(lat), out=tmp_path / "dl", vocab_size=280, quiet=True)
    out = prepare(str(lat), out=tmp_path / "dl", vocab_size=280, quiet=True, encoding="latin-1")
    td = TokenData(out)
    text = td.tokenizer().decode(np.asarray(td.tokens("train", "latin")).tolist())
    assert "café crème brûlée" in text and "\ufffd" not in text
    assert td.manifest["sources"][0]["documents"] == 4  # the binary x.txt was skipped
