"""`flywheel pretrain` and `flywheel sft` end to end through the CLI, and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flywheel.cli import main
from flywheel.data.batching import collate_lm, eval_lm_loss
from flywheel.models import load_causal_lm
from flywheel.tokenization import load_tokenizer, render_conversation


def _demos(path, n=48):
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"It is {a + b}."},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_sft_trains_on_assistant_tokens_and_saves_a_plain_model(tmp_path, model_dir):
    data = tmp_path / "demos.jsonl"
    rows = _demos(data)
    out = tmp_path / "sft"
    code = main(
        [
            "sft",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "4",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--progress",
            "false",
            "--eval-split",
            "0.1",
        ]
    )
    assert code == 0
    cfg = (out / "config.yaml").read_text()
    assert "lr: 0.003" in cfg and f"data: {data}" in cfg
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics)
    tok = load_tokenizer(str(out / "final"))
    before, after = load_causal_lm(str(model_dir)), load_causal_lm(str(out / "final"))
    samples = []
    for r in rows[:8]:
        ids, mask = render_conversation(tok, r["messages"])
        samples.append({"input_ids": ids, "loss_mask": mask})
    with torch.no_grad():
        assert eval_lm_loss(after, samples, tok.pad_token_id) < 0.5 * eval_lm_loss(before, samples, tok.pad_token_id)
    # The loss covered the answers only: the prompt tokens are masked in what SFT trains on.
    batch = collate_lm(samples[:1], tok.pad_token_id)
    assert batch["weight"] == sum(samples[0]["loss_mask"][1:]) < len(samples[0]["input_ids"]) // 2


def test_sft_packing_and_yaml_config(tmp_path, model_dir):
    data = tmp_path / "demos.jsonl"
    _demos(data, 16)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {model_dir}\ndata: {data}\nmax_steps: 2\npacking: true\nmax_length: 64\nprogress: false\n")
    assert main(["sft", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_pretrain_builds_tokenizer_and_model(tmp_path):
    from tests.conftest import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 10))
    out = tmp_path / "base"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--size",
                "nano",
                "--vocab-size",
                "300",
                "--seq-len",
                "32",
                "--max-steps",
                "5",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in metrics[-1]
    tok = load_tokenizer(str(out / "final"))
    assert tok.pad_token_id != tok.eos_token_id
    assert load_causal_lm(str(out / "final")).config.vocab_size == len(tok)


def test_pretrain_refuses_what_it_cannot_use_before_training(tmp_path, capsys):
    """An unknown --size or a vocabulary too small to hold a merge is refused before the tokenizer is trained; a
    held-out corpus shorter than one block would give no eval loss at all: an error, nothing left behind."""
    from tests.conftest import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 10))
    short = tmp_path / "short.txt"
    short.write_text("hello world\n")
    base = ["pretrain", "--data", str(corpus), "--out", str(tmp_path / "o"), "--seq-len", "32", "--max-steps", "1"]
    for extra, message in (
        (["--size", "huge"], "unknown --size 'huge'"),
        (["--vocab-size", "10"], "--vocab-size must be more than 260"),
        (
            ["--size", "nano", "--vocab-size", "300", "--eval-data", str(short)],
            f"{short}: the held-out corpus is shorter",
        ),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flywheel", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}', "unknown role"),
        ('{"messages": [', "bad JSON"),
    ],
)
def test_bad_record_is_one_line_with_file_and_line(tmp_path, model_dir, line, fragment):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    data.write_text(f"{good}\n{line}\n")
    res = _cli("sft", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and f"{data}:2:" in err[0] and fragment in err[0], res.stderr
    assert not (tmp_path / "o" / "final").exists()


def test_a_refused_input_leaves_a_finished_runs_config_as_it_was(tmp_path, model_dir, capsys):
    """config.yaml describes the run's final/: a rerun whose data, YAML or model is refused must not rewrite it."""
    data = tmp_path / "demos.jsonl"
    _demos(data, 8)
    out = tmp_path / "run"
    args = ["sft", "--model", str(model_dir), "--out", str(out), "--max-steps", "1", "--batch-size", "4"]
    assert main([*args, "--data", str(data)]) == 0
    before = (out / "config.yaml").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "no question"}]}\n')
    notok = tmp_path / "notok"
    notok.mkdir()
    (notok / "config.json").write_text((model_dir / "config.json").read_text())
    yaml_bytes = tmp_path / "latin1.yaml"
    yaml_bytes.write_bytes(b"lr: 0.5  # caf\xe9\n")
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text("1: 2\n")
    for extra, message in [
        (["--data", str(bad), "--lr", "0.5"], f"{bad}:1:"),
        (["--data", str(data), "--model", str(notok)], "holds no tokenizer"),
        (["--data", str(data), "--config", str(yaml_bytes)], f"{yaml_bytes}: not valid UTF-8 (byte 15)"),
        (["--data", str(data), "--config", str(keyed)], "a config file's fields are names, not 1"),
    ]:
        capsys.readouterr()
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert (out / "config.yaml").read_text() == before


def test_missing_model_and_flags_are_one_line_errors(tmp_path):
    res = _cli("sft", "--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "does not exist" in res.stderr
    res = _cli("sft", "--data", "x.jsonl", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "--model is required" in res.stderr
    res = _cli("nonsense")
    assert res.returncode == 2 and "unknown command" in res.stderr


def test_rerun_into_a_run_dir_with_checkpoints_needs_resume(tmp_path, model_dir, capsys):
    data = tmp_path / "demos.jsonl"
    _demos(data, 16)
    args = [
        "sft",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "r"),
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--progress",
        "false",
    ]
    assert main(args) == 0
    assert main(args) == 2  # refuses to clobber
    # a resume continues the same run: what it computes may not change (config.yaml would describe steps that
    # never ran with it); where it reports may
    out = str(tmp_path / "r")
    assert main(args + ["--resume", "--lr", "1e-3", "--seed", "3"]) == 2
    assert (
        f"--resume: settings differ from the run in {out} (seed 0 -> 3; lr 0.0001 -> 0.001)" in capsys.readouterr().err
    )
    # (the number of threads changes the last bits of every sum: a different one is no longer the same run)
    assert main(args + ["--resume", "--threads", "1"]) == 2
    assert "threads 0 -> 1" in capsys.readouterr().err
    assert main(args + ["--resume", "--log-every", "1"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sft", "--threads", "-1"], "--threads must be >= 0"),
        (["sft", "--warmup-ratio", "2"], "--warmup-ratio and --min-lr-ratio must be in [0, 1]"),
        (["sft", "--save-every", "-1"], "--save-every must be >= 0"),
        (["sft", "--log-every", "0"], "--log-every must be >= 1"),
        (["sft", "--eval-split", "1.5"], "--eval-split must be in [0, 1)"),
        (["rm", "--eval-split", "-0.1"], "--eval-split must be in [0, 1)"),
        (["ppo", "--prompts", "p.jsonl", "--kl-coef", "-1"], "--kl-coef must be >= 0"),
        (["ppo", "--prompts", "p.jsonl", "--vf-coef", "-1"], "--vf-coef must be >= 0"),
        (["ppo", "--prompts", "p.jsonl", "--cliprange", "0"], "--cliprange must be > 0"),
        (["ppo", "--prompts", "p.jsonl", "--gamma", "2"], "--gamma and --lam must be in [0, 1]"),
        (["ppo", "--prompts", "p.jsonl", "--lam", "-1"], "--gamma and --lam must be in [0, 1]"),
        (["rl", "--prompts", "p.jsonl", "--cliprange", "-0.2"], "--cliprange must be > 0"),
        (["rl", "--prompts", "p.jsonl", "--vf-coef", "nan"], "'vf_coef' must be a finite number, got 'nan'"),
        (["sft", "--lr", "inf"], "'lr' must be a finite number, got 'inf'"),
    ],
)
def test_out_of_range_values_are_one_line_errors_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    data = ["--data", "d.jsonl"] if argv[0] in ("sft", "rm") else []
    assert main([*argv, "--model", "m", *data, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_config_files_bad_value_is_named_with_the_file(tmp_path, capsys):
    for text, message in (
        ("lr: fast\n", "config field 'lr' must be float, got 'fast'"),
        ("batch_size: true\n", "config field 'batch_size' must be int, got True"),  # a YAML true is no batch size
        ("report_to: 5\n", "config field 'report_to' must be list, got 5"),
    ):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        argv = ["sft", "--config", str(cfg), "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == f"flywheel sft: {cfg}: {message}"
    afile = tmp_path / "afile"
    afile.write_text("")
    _demos(tmp_path / "demos.jsonl", 4)
    argv = ["sft", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "demos.jsonl"), "--out", str(afile)]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"flywheel sft: --out {afile} is a file, not a run directory"


def test_a_resume_between_two_log_lines_logs_what_the_whole_run_logs(tmp_path, model_dir):
    """A checkpoint keeps the metrics of the steps since the last log line: the resumed run's next line averages
    the same steps as the uninterrupted run's (not only those after the resume)."""
    import shutil

    _demos(tmp_path / "demos.jsonl", 24)
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["sft", "--model", str(model_dir), "--data", str(tmp_path / "demos.jsonl"), "--max-steps", "5"]
    args += ["--batch-size", "2", "--save-every", "1", "--log-every", "3", "--progress", "false", "--threads", "1"]
    assert main([*args, "--out", str(full)]) == 0
    shutil.copytree(full, cut)  # as if killed after step 4: its checkpoint is the last one (none after the last step)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-3", "step-4"]
    shutil.rmtree(cut / "final")
    assert main([*args, "--out", str(cut), "--resume"]) == 0

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    assert [r["step"] for r in rows(full) if "loss" in r] == [3, 5]
    assert rows(cut) == rows(full)
