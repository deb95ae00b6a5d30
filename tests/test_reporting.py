"""`--report-to`: metrics.jsonl always, plus TensorBoard and/or Weights & Biases (checked offline: WANDB_MODE=offline
writes the run into WANDB_DIR, whose history this test reads back)."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import types
from pathlib import Path

import pytest

from flywheel.cli import main
from flywheel.config import parse_config
from flywheel.errors import UserError
from flywheel.train import reporting
from flywheel.train.reporting import report_targets
from flywheel.train.sft import SFTConfig


def _demos(path: Path, n: int = 8) -> Path:
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]
    path.write_text("".join(json.dumps({"messages": conv}) + "\n" for _ in range(n)))
    return path


def _sft(tmp_path: Path, model_dir: Path, *flags: str) -> tuple[int, Path]:
    out = tmp_path / "run"
    argv = ["sft", "--model", str(model_dir), "--data", str(_demos(tmp_path / "demos.jsonl")), "--out", str(out)]
    argv += [
        "--max-steps",
        "3",
        "--log-every",
        "1",
        "--batch-size",
        "2",
        "--eval-split",
        "0.25",
        "--progress",
        "false",
    ]
    return main([*argv, *flags]), out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_report_targets():
    assert report_targets([]) is None  # the default: TensorBoard when installed
    assert report_targets(["none"]) == []
    assert report_targets(["tensorboard,wandb"]) == ["tensorboard", "wandb"]  # TRL's comma-separated form
    assert report_targets(["wandb", "WandB", "tensorboard"]) == ["wandb", "tensorboard"]
    with pytest.raises(UserError, match="unknown mlflow"):
        report_targets(["mlflow"])
    with pytest.raises(UserError, match="none cannot be combined with wandb"):
        report_targets(["none", "wandb"])


def test_report_to_all_is_every_installed_reporter(monkeypatch):
    from flywheel.train import reporting

    monkeypatch.setattr(reporting, "installed", lambda package: package == "tensorboard")
    assert report_targets(["all"]) == ["tensorboard"] and report_targets(["wandb", "all"]) == ["wandb", "tensorboard"]
    monkeypatch.setattr(reporting, "installed", lambda package: False)
    assert report_targets(["all"]) == []


def test_report_to_as_flag_list_trl_name_and_yaml_string(tmp_path):
    base = ["--model", "m", "--data", "d.jsonl", "--out", "o"]
    assert parse_config(SFTConfig, [*base, "--report-to", "none"], "sft").report_to == ["none"]
    assert parse_config(SFTConfig, [*base, "--report_to", "none"], "sft").report_to == ["none"]
    conf = tmp_path / "sft.yaml"
    conf.write_text("model: m\ndata: d.jsonl\nout: o\nreport_to: none\n")
    assert parse_config(SFTConfig, ["--config", str(conf)], "sft").report_to == ["none"]


def _wandb_history(wandb_dir: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of the one offline run in `wandb_dir`."""
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    return _read_wandb_file(path)


def _read_wandb_file(path: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline run's `.wandb` file: a LevelDB-style log of protobuf records (a 7-byte
    file header, 32 KiB blocks, chunks of crc32 | length | kind | data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    config: dict = {}
    history: list[dict] = []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FIRST / MIDDLE chunks of a record continue in the next chunk
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        buf = b""
        if record.WhichOneof("record_type") == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif record.WhichOneof("record_type") == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return config, history


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Weights & Biases offline and silent, writing under the returned directory (skipped where wandb is absent)."""
    pytest.importorskip("wandb")
    wb = tmp_path / "wb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wb))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb.mkdir()
    return wb


def test_wandb_offline_run_gets_the_same_metrics(tmp_path, model_dir, wandb_dir):
    code, out = _sft(tmp_path, model_dir, "--report-to", "wandb", "--lr", "0.01")
    assert code == 0
    config, history = _wandb_history(wandb_dir)
    assert config["lr"] == 0.01 and config["out"] == str(out)
    logged: dict[int, dict] = {}
    for row in history:
        logged.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    expected: dict[int, dict] = {}
    for row in _metrics(out):
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    assert sorted(logged) == [1, 2, 3] and {"loss", "lr", "grad_norm", "eval_loss"} <= set(logged[3])
    for step, metrics in expected.items():
        assert logged[step] == pytest.approx(metrics, rel=1e-6), step
    assert (out / reporting.WANDB_ID_FILE).read_text().strip() in str(next(wandb_dir.glob("wandb/offline-*")))


def test_resume_continues_the_same_wandb_run(tmp_path, model_dir, wandb_dir):
    code, out = _sft(tmp_path, model_dir, "--report-to", "wandb", "--max-steps", "4", "--save-every", "2")
    assert code == 0
    shutil.rmtree(out / "final")  # as if the run had stopped after its step-2 checkpoint
    code, _ = _sft(tmp_path, model_dir, "--report-to", "wandb", "--max-steps", "4", "--save-every", "2", "--resume")
    assert code == 0
    run_id = (out / reporting.WANDB_ID_FILE).read_text().strip()
    first, second = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert first.name == second.name == f"run-{run_id}.wandb"  # one W&B run, written in two sessions
    steps = [{row["_step"] for row in _read_wandb_file(path)[1]} for path in (first, second)]
    assert steps == [{1, 2, 3, 4}, {3, 4}]


def test_a_reporter_that_is_not_installed_is_a_one_line_error(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setattr(reporting, "installed", lambda package: package != "wandb")
    code, out = _sft(tmp_path, model_dir, "--report-to", "wandb")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [
        "flywheel sft: --report-to wandb needs the wandb package: pip install wandb"
    ]
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # installed but not importable: the same message when opened
    with pytest.raises(UserError, match="needs the wandb package"):
        reporting.open_reporters(tmp_path, ["wandb"], None, resumed=False)


class _FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is not a dependency)."""

    runs: list[_FakeWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeWriter.runs.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((step, tag, value))

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("flags", "writes"), [((), True), (("--report-to", "tensorboard"), True), (("--report-to", "none"), False)]
)
def test_tensorboard_by_default_when_installed_unless_none(tmp_path, model_dir, monkeypatch, flags, writes):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeWriter))
    monkeypatch.setattr(reporting, "installed", lambda package: True)
    _FakeWriter.runs = []
    code, out = _sft(tmp_path, model_dir, *flags)
    assert code == 0
    if not writes:
        assert _FakeWriter.runs == []
        return
    (writer,) = _FakeWriter.runs
    assert writer.log_dir == str(out / "tensorboard") and writer.closed
    expected = [(r["step"], k, v) for r in _metrics(out) for k, v in r.items() if k != "step"]
    assert sorted(writer.scalars) == sorted(expected)


def test_tensorboard_asked_for_but_missing_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="needs the tensorboard package"):
        reporting.open_reporters(tmp_path, ["tensorboard"], None, resumed=False)
    assert reporting.open_reporters(tmp_path, [], None, resumed=False) == []  # the default: silently none
