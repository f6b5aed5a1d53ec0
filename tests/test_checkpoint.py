"""Checkpoints survive faults: checksums verified at load with a fallback to the newest intact step, one training
process per run folder, safe loading only, and SIGKILL at random moments never costs more than the steps since the
last checkpoint (the resumed run ends bit-identical to an uninterrupted one)."""

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparkformer.checkpoint import (CheckpointDamaged, RunLock, RunLocked, intact_checkpoint, latest_checkpoint,
                                    load_checkpoint, load_safetensors, resolve_checkpoint, verify_checkpoint)
from sparkformer.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import REPO, data_dir, micro_cfg, records  # noqa: E402,F401  (data_dir: the module fixture)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):  # noqa: F811
    """A finished micro run with checkpoints step-4 and step-8 (trained once; tests copy it)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and far faster than two on a busy machine
    try:
        train(micro_cfg(data_dir, out))
    finally:
        torch.set_num_threads(n)
    return out


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def run(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    else:  # random bytes in the middle, same size
        raw = bytearray(path.read_bytes())
        mid = len(raw) // 2
        raw[mid: mid + 64] = random.Random(0).randbytes(64)
        path.write_bytes(bytes(raw))


# ---- checksums, fallback, refusal ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,how", [("model.safetensors", "truncate"), ("model.safetensors", "random"),
                                      ("trainer_state.pt", "random"), ("config.json", "truncate")])
def test_damaged_newest_checkpoint_falls_back_everywhere(run, data_dir, capsys, name, how):  # noqa: F811
    from sparkformer.evaluate import evaluate
    from sparkformer.generate import generate_text

    step8, step4 = run / "checkpoints" / "step-0000008", run / "checkpoints" / "step-0000004"
    assert json.loads((step8 / "checksums.json").read_text())["files"][name]["bytes"] == (step8 / name).stat().st_size
    _damage(step8 / name, how)
    with pytest.raises(CheckpointDamaged, match=f"step-0000008 is damaged: {name}") as e:
        verify_checkpoint(step8)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    # a run folder: the newest intact step, with one warning line naming the damaged one
    assert resolve_checkpoint(run) == step4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step-0000008 is damaged" in err and "falling back to step-0000004" in err
    model, info = load_checkpoint(run)
    assert info["path"] == str(step4)
    ev = evaluate(run, seq_len=32, max_tokens=200)
    assert ev["checkpoint"] == str(step4)
    capsys.readouterr()
    assert generate_text(str(run), "the king", 3, temperature=0.0)["new_tokens"] >= 1
    assert "falling back to step-0000004" in capsys.readouterr().err
    # asked for explicitly: refused, naming it and the way out
    with pytest.raises(CheckpointDamaged, match="step-0000008 is damaged.*give the run folder.*step-0000004"):
        load_checkpoint(step8)
    # --resume continues from step 4 and rewrites step 8: bit-identical to the undamaged run
    res = train(micro_cfg(data_dir, run), resume=True)
    assert res["resumed_from"] == 4 and res["step"] == 8
    assert "--resume: continuing from step 4" in capsys.readouterr().err
    verify_checkpoint(step8)
    assert [r["step"] for r in records(run)] == list(range(1, 9))


def test_cli_names_the_damaged_checkpoint_in_one_line(run, capsys):
    from sparkformer.cli import main

    step8 = run / "checkpoints" / "step-0000008"
    for name in ("model.safetensors", "trainer_state.pt"):
        _damage(step8 / name, "random")
    (run / "checkpoints" / "step-0000004" / "model.safetensors").write_bytes(b"\0" * 4000)
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--seq-len", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparkformer eval: error: checkpoint") and "no intact checkpoint" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["generate", "--model", str(step8), "--prompt", "hi"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "step-0000008 is damaged" in out.err and len(out.err.strip().splitlines()) == 1


def test_checkpoints_written_before_checksums_are_still_checked(run):
    step8 = run / "checkpoints" / "step-0000008"
    (step8 / "checksums.json").unlink()
    verify_checkpoint(step8)  # intact, unverifiable by checksum: header, JSON and zip records check out
    _damage(step8 / "model.safetensors", "truncate")
    with pytest.raises(CheckpointDamaged, match="model.safetensors: .* bytes, the header describes"):
        verify_checkpoint(step8)
    shutil.copytree(run / "checkpoints" / "step-0000004", step8, dirs_exist_ok=True)
    (step8 / "checksums.json").unlink()
    _damage(step8 / "trainer_state.pt", "random")
    with pytest.raises(CheckpointDamaged, match="trainer_state.pt"):
        verify_checkpoint(step8)


# ---- safe loading ----------------------------------------------------------------------------------------------------
def test_headers_claiming_more_than_the_file_are_refused(tmp_path):
    import struct

    f = tmp_path / "huge.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointDamaged, match="huge.safetensors.*past|claims|describes"):
        load_safetensors(f)
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointDamaged, match="header claims"):
        load_safetensors(f)

    from sparkformer.pretrained import check_gguf_header

    g = tmp_path / "huge.gguf"
    name = b"w"
    body = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)  # one tensor, no metadata
    body += struct.pack("<Q", len(name)) + name + struct.pack("<I", 2) + struct.pack("<QQ", 1 << 20, 1 << 20)
    body += struct.pack("<IQ", 0, 0)  # F32 at offset 0: claims 4 TiB
    g.write_bytes(body + b"\0" * 64)
    with pytest.raises(ValueError, match="huge.gguf: not a valid GGUF file .*tensor 'w' claims"):
        check_gguf_header(g)
    g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0))
    with pytest.raises(ValueError, match="claims 1152921504606846976 tensors"):
        check_gguf_header(g)


def test_loading_is_safe_by_construction():
    """No torch.load without weights_only=True and no trust_remote_code=True anywhere in the package."""
    for f in (REPO / "sparkformer").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                kw = {k.arg: k.value for k in node.keywords}
                if name == "load" and isinstance(fn, ast.Attribute) and getattr(fn.value, "id", "") == "torch":
                    assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, f
                if "trust_remote_code" in kw:
                    assert isinstance(kw["trust_remote_code"], ast.Constant) and not kw["trust_remote_code"].value, f


# ---- one process per run folder --------------------------------------------------------------------------------------
_HOLD = ("import sys, time; sys.path.insert(0, {repo!r}); from sparkformer.checkpoint import RunLock; "
         "RunLock({path!r}).acquire(); print('locked', flush=True); time.sleep(60)")


def test_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(run, data_dir, capsys):  # noqa: F811
    holder = subprocess.Popen([sys.executable, "-c", _HOLD.format(repo=str(REPO), path=str(run))],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"in use by another training process \\(pid {holder.pid}"):
            train(micro_cfg(data_dir, run, max_steps=9), resume=True)
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # left behind by the killed holder
    capsys.readouterr()
    res = train(micro_cfg(data_dir, run, max_steps=9), resume=True)
    assert res["step"] == 9
    assert f"took over the lock of {run} left by pid {holder.pid} (no longer running)" in capsys.readouterr().err
    assert not (run / ".lock").exists()  # released at the end
    assert [r["step"] for r in records(run)] == list(range(1, 10))


# ---- SIGKILL at random moments ----------------------------------------------------------------------------------------
def _child_train(cfg, die_at_write: int | None = None) -> int:
    """Fork a process that trains (resuming); with ``die_at_write=n`` it SIGKILLs itself just before its n-th file
    system step of a checkpoint write (an fsync, a rename, a folder removal)."""
    import safetensors.torch  # noqa: F401  (imported once here, not again in every child)
    import torch._dynamo  # noqa: F401  (AdamW's first use imports it: ~1 s)
    import torch.distributed.checkpoint.state_dict  # noqa: F401

    pid = os.fork()
    if pid == 0:  # child: train and exit without running the parent's cleanup
        code = 1
        try:
            torch.set_num_threads(1)
            sys.stderr = open(os.devnull, "w")
            if die_at_write is not None:
                calls = [0]

                def dying(fn):
                    def wrapped(*a, **kw):
                        calls[0] += 1
                        if calls[0] == die_at_write:
                            os.kill(os.getpid(), signal.SIGKILL)
                        return fn(*a, **kw)
                    return wrapped

                os.fsync, os.replace, shutil.rmtree = dying(os.fsync), dying(os.replace), dying(shutil.rmtree)
            train(cfg, resume=True)
            code = 0
        finally:
            os._exit(code)
    return pid


def _step(out: Path) -> int:
    ck = latest_checkpoint(out)
    return int(ck.name.split("-")[1]) if ck is not None else 0


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, data_dir):  # noqa: F811
    """Killed (SIGKILL) eight times, at random moments of the step / checkpoint cycle from outside and at random
    points of a checkpoint write from inside, then resumed: the same weights, optimizer state and metrics as an
    uninterrupted run, and never a checkpoint under its final name that is not complete."""
    kw = dict(max_steps=14, checkpoint_interval=1, keep_checkpoints=2, eval_interval=7)
    ref = tmp_path / "ref"
    t = time.time()
    _, status = os.waitpid(_child_train(micro_cfg(data_dir, ref, **kw)), 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    period = (time.time() - t) / 14  # one step and its checkpoint
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills, partial = 0, 0
    for i in range(8):
        before = _step(out)
        if i % 2:  # from outside, once the process has made progress, at a random phase of its next step
            pid = _child_train(micro_cfg(data_dir, out, **kw))
            deadline = time.time() + 30
            while _step(out) <= before and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 1.5) * period)
            os.kill(pid, signal.SIGKILL)
        else:  # from inside, just before a random file system step of a checkpoint write
            pid = _child_train(micro_cfg(data_dir, out, **kw), die_at_write=rng.randint(1, 30))
        _, status = os.waitpid(pid, 0)
        kills += os.WIFSIGNALED(status)
        partial += sum(1 for p in (out / "checkpoints").glob("*") if ".tmp" in p.name or ".deleting" in p.name)
        for p in (out / "checkpoints").glob("step-*"):
            if "." not in p.name:  # under its final name: always complete and intact
                verify_checkpoint(p)
        if _step(out) == 14:
            break
    print(f"{kills} kills; {partial} half-written or half-removed folders seen, none under a final name")
    assert kills >= 4 and partial >= 1, (kills, partial)  # some kills landed inside a checkpoint write
    res = train(micro_cfg(data_dir, out, **kw), resume=True)
    assert res["step"] == 14
    a, b = latest_checkpoint(ref), latest_checkpoint(out)
    assert a.name == b.name == "step-0000014"
    sa, sb = load_safetensors(a / "model.safetensors"), load_safetensors(b / "model.safetensors")
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    ta = torch.load(a / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    tb = torch.load(b / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(ta[k][n], tb[k][n]) for k in ta for n in ("exp_avg", "exp_avg_sq"))
    assert [(r["step"], r["loss"]) for r in records(out)] == [(r["step"], r["loss"]) for r in records(ref)]
    assert [(r["step"], r["val_loss"]) for r in records(out, "eval")] == \
        [(r["step"], r["val_loss"]) for r in records(ref, "eval")]
    assert intact_checkpoint(out) == b
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".") or ".tmp" in p.name]
