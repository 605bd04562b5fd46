"""report_to: tensorboard: the event files hold what metrics.jsonl and evals.jsonl hold, step for step, each client
under its own name, with the config, the summary and the loss plot; no report_to writes nothing."""

import json

import pytest

from configs import tiny
from splittune.config import ConfigError, load_config
from splittune.run import train
from splittune.track import TrackingError, open_trackers

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

RUN = tiny("cuts=[1,3]", "train.steps=3", "data.max_documents=8", "train.eval_every=1")


def logged(out):
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("clients", [1, 2])
def test_the_event_files_hold_every_step_and_evaluation(tmp_path, clients):
    extra = ["report_to=tensorboard"] + (["clients=2", "schedule=sfl-v1"] if clients > 1 else [])
    summary = train(load_config(None, [*RUN, *extra]), tmp_path / "run")
    acc = logged(tmp_path / "run")
    for row in jsonl(tmp_path / "run" / "metrics.jsonl"):
        prefix = f"client{row['client']}/train" if clients > 1 else "train"
        for key in ("loss", "lr", "bytes_up", "bytes_down", "tokens", "step_s"):
            (event,) = [e for e in acc.Scalars(f"{prefix}/{key}") if e.step == row["step"]]
            assert event.value == pytest.approx(row[key], rel=1e-6), (key, row["step"])
    evals = jsonl(tmp_path / "run" / "evals.jsonl")
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in evals]
    assert [e.step for e in acc.Scalars("eval/ppl")] == [0, 1, 2, 3]
    assert acc.Scalars("summary/eval_loss_after")[0].value == pytest.approx(summary["eval_loss_after"], rel=1e-6)
    assert "plots/loss" in acc.Tags()["images"]
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"report_to": [\n    "tensorboard"\n  ]' in config and '"steps": 3' in config


def test_without_report_to_nothing_is_written_and_a_wrong_name_is_refused(tmp_path):
    train(load_config(None, RUN), tmp_path / "run")
    for made in ("tensorboard", "mlruns", "wandb", "tracking.json"):  # the twin: the trackers are what made the files
        assert not (tmp_path / "run" / made).exists(), made
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, tiny("report_to=[tensorbord]"))


def test_a_missing_library_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(TrackingError, match=r"report_to: tensorboard needs the tensorboard package: pip install 'splittune\[tracking\]'"):
        open_trackers(["tensorboard"], tmp_path, False)
