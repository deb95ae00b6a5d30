"""Distributed training on CPU with gloo: real `torchrun --nproc_per_node 2` processes against a 1-process run.

2 processes x batch 4 must compute what 1 process x batch 8 computes (loss curve and final weights, fp32 up to float
noise); resume works at the same world size and is refused at another; FSDP2 trains too; PPO shards its rollouts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.test_reward import preference_rows, write_jsonl
from tests.test_sft import _demos

from flywheel.cli import main
from flywheel.distributed import launch_command, strip_nproc, torchrun_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "flywheel",
        *args,
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    """Equal up to float noise: every weight within 1e-4, at most 0.1% of them further apart than 1e-5 (Adam turns a
    ~1e-9 gradient difference on a near-zero gradient into a visible step; a real bug moves whole tensors by ~lr)."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k] - wb[k]).abs()
        assert float(diff.max()) < 1e-4, (k, float(diff.max()))
        assert float((diff > 1e-5).float().mean()) <= 1e-3, (k, int((diff > 1e-5).sum()))


def assert_same_curves(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for k in keys:
            if k in x or k in y:
                # Adam amplifies float noise (sums in another order) once gradients get small; a wrong normalisation
                # would be off by ~1e-1 from step 1.
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k, x[k], y[k])


def test_launcher_strips_nproc_and_runs_torchrun():
    assert strip_nproc(["--model", "m", "--nproc", "4", "--bf16"]) == ["--model", "m", "--bf16"]
    assert strip_nproc(["--nproc=4", "--out", "o"]) == ["--out", "o"]
    args = ["--standalone", "--nproc_per_node", "2", "-m", "flywheel", "sft", "--out", "o"]
    assert torchrun_args("sft", ["--nproc", "2", "--out", "o"], 2) == args
    cmd = launch_command("sft", ["--nproc", "2", "--out", "o"], 2)
    assert cmd[0] == sys.executable and cmd[1] == "-c" and "torchrun_main" in cmd[2] and cmd[3:] == args


def test_bad_input_under_nproc_is_one_line_once_and_leaves_no_run_dir(tmp_path, model_dir):
    """Every rank hits the same bad record: the launcher prints its one line once, exits 2 like one process, shows
    no traceback (neither the ranks' nor torchrun's) and leaves no half-written run directory."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    args = ["sft", "--model", str(model_dir), "--data", str(bad), "--progress", "false"]
    one = subprocess.run(
        [sys.executable, "-m", "flywheel", *args, "--out", str(tmp_path / "one")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    two = subprocess.run(
        [sys.executable, "-m", "flywheel", *args, "--out", str(tmp_path / "two"), "--nproc", "2"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = "flywheel sft: " + str(bad) + ":1: messages must end with an assistant message"
    assert one.returncode == two.returncode == 2, two.stderr[-4000:]
    assert one.stderr.count(line) == two.stderr.count(line) == 1, two.stderr[-4000:]
    errors = [ln for ln in two.stderr.splitlines() if not ln.startswith("launching 2 processes")]
    assert len(errors) == 1 and errors[0].startswith(line), two.stderr[-4000:]
    assert "Traceback" not in two.stderr + two.stdout and "ChildFailedError" not in two.stderr
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()


@pytest.fixture
def demos(tmp_path):
    path = tmp_path / "demos.jsonl"
    _demos(path, 40)
    return str(path)


SFT = ("--lr", "3e-3", "--log-every", "1", "--progress", "false", "--eval-split", "0.1", "--warmup-ratio", "0")


def test_sft_two_processes_batch_4_equal_one_process_batch_8(tmp_path, model_dir, demos):
    one, two = tmp_path / "one", tmp_path / "two"
    assert (
        main(
            [
                "sft",
                "--model",
                str(model_dir),
                "--data",
                demos,
                "--out",
                str(one),
                "--batch-size",
                "8",
                "--max-steps",
                "4",
                *SFT,
            ]
        )
        == 0
    )
    # Through the launcher: `flywheel sft --nproc 2` re-executes itself under torchrun.
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "flywheel",
            "sft",
            "--nproc",
            "2",
            "--model",
            str(model_dir),
            "--data",
            demos,
            "--out",
            str(two),
            "--batch-size",
            "4",
            "--max-steps",
            "4",
            *SFT,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("fine-tuned model:") == 1  # rank 0 alone reports (and writes)
    assert_same_curves(one, two, ("loss", "grad_norm", "lr", "eval_loss"))
    assert_same_weights(one / "final", two / "final")
    assert not list((two / "final").glob("rng*"))
    losses = [r["loss"] for r in metrics(two) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_rm_two_processes_batch_4_equal_one_process_batch_8(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40, seed=0))
    args = (
        "--model",
        str(model_dir),
        "--data",
        data,
        "--lr",
        "1e-3",
        "--log-every",
        "1",
        "--progress",
        "false",
        "--max-steps",
        "3",
        "--eval-split",
        "0.1",
        "--warmup-ratio",
        "0",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["rm", *args, "--out", str(one), "--batch-size", "8"]) == 0
    torchrun("rm", *args, "--out", str(two), "--batch-size", "4")
    assert_same_curves(one, two, ("loss", "accuracy", "margin", "eval_loss", "eval_accuracy"))
    assert_same_weights(one / "final", two / "final")
    offset = [json.loads((run / "final" / "config.json").read_text())["flywheel_reward_offset"] for run in (one, two)]
    assert offset[0] == pytest.approx(offset[1], abs=1e-5)


@pytest.mark.slow
def test_resume_at_the_same_world_size_is_exact_and_another_is_refused(tmp_path, model_dir, demos):
    args = (
        "sft",
        "--model",
        str(model_dir),
        "--data",
        demos,
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        *SFT,
    )
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(*args, "--out", str(full))
    ckpt = full / "checkpoints" / "step-2"
    assert sorted(p.name for p in ckpt.glob("rng*")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world"] == 2
    assert "nproc: 2" in (full / "config.yaml").read_text()  # the saved config resumes the run as it ran
    # A run that stopped after step 2: its checkpoint and config survive; resume it with 2 processes.
    shutil.copytree(ckpt, cut / "checkpoints" / "step-2")
    assert main([*args, "--out", str(cut), "--resume"]) == 2  # 1 process cannot continue a 2-process run
    torchrun(*args, "--out", str(cut), "--resume")
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if r["step"] > 2]  # noqa: E731
    assert strip(metrics(cut)) == strip(metrics(full))


@pytest.mark.slow
def test_fsdp2_sft_on_gloo_equals_one_process_and_resumes(tmp_path, model_dir, demos):
    """FSDP2 (fully_shard) runs on CPU with gloo: sharded training computes the 1-process update; checkpoints hold
    the gathered full model and optimizer state, and resume from them."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("sft", "--model", str(model_dir), "--data", demos, "--max-steps", "4", *SFT)
    assert main([*args, "--out", str(one), "--batch-size", "8"]) == 0
    torchrun(*args, "--out", str(two), "--batch-size", "4", "--strategy", "fsdp", "--save-every", "2")
    assert_same_curves(one, two, ("loss", "grad_norm", "eval_loss"))
    assert_same_weights(one / "final", two / "final")
    cut = tmp_path / "cut"
    shutil.copytree(two / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    torchrun(*args, "--out", str(cut), "--batch-size", "4", "--strategy", "fsdp", "--save-every", "2", "--resume")
    a, b = load_file(str(two / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ppo_main(argv: list[str]) -> None:
    """The test entry point torchrun starts: `flywheel ppo` with the programmatic reward of tests/test_ppo.py."""
    from tests.test_ppo import target_reward

    from flywheel.config import parse_config
    from flywheel.train.ppo.config import PPOConfig
    from flywheel.train.ppo.trainer import train_ppo

    train_ppo(parse_config(PPOConfig, argv, "ppo-test"), reward_fn=target_reward)


@pytest.mark.slow
def test_ppo_with_two_processes_shards_rollouts_and_learns(tmp_path, model_dir, prompts_file):
    out = tmp_path / "ppo"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tests.test_distributed",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts_file),
        "--out",
        str(out),
        "--max-steps",
        "16",
        "--rollout-batch-size",
        "16",
        "--batch-size",
        "8",
        "--ppo-epochs",
        "2",
        "--max-new-tokens",
        "8",
        "--lr",
        "1e-2",
        "--kl-coef",
        "0.03",
        "--missing-eos-penalty",
        "0",
        "--seed",
        "1",
        "--progress",
        "false",
        "--sample-every",
        "4",
        "--save-every",
        "8",
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=500, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))  # rank 0 alone logs
    first, late = rows[0]["score"], sum(r["score"] for r in rows[-4:]) / 4
    assert late > 2 * first, (first, late)
    assert 0 < rows[-1]["kl"]
    ckpt = out / "checkpoints" / "step-8"
    assert sorted(p.name for p in ckpt.glob("rng*")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert (out / "final" / "model.safetensors").is_file() and (out / "final_value" / "config.json").is_file()


def test_global_whitening_over_ranks_equals_one_process(tmp_path):
    """distributed.masked_whiten on 2 gloo ranks == ppo.advantages.masked_whiten on the concatenated batch."""
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) > 0.3).double()
    torch.save({"x": x, "mask": mask}, tmp_path / "in.pt")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tests.test_distributed",
        "--whiten",
        str(tmp_path),
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-4000:]
    from flywheel.train.ppo.advantages import masked_whiten

    expected = masked_whiten(x, mask)
    got = torch.cat([torch.load(tmp_path / f"out{r}.pt") for r in range(2)])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def _whiten_main(folder: Path) -> None:
    from flywheel import distributed

    distributed.init()
    data = torch.load(folder / "in.pt")
    rows = slice(3 * distributed.rank(), 3 * distributed.rank() + 3)
    torch.save(distributed.masked_whiten(data["x"][rows], data["mask"][rows]), folder / f"out{distributed.rank()}.pt")


if __name__ == "__main__":
    if sys.argv[1] == "--whiten":
        _whiten_main(Path(sys.argv[2]))
    else:
        _ppo_main(sys.argv[1:])
