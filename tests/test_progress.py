"""LogProgress: plain progress lines when output goes to a file (progress bars show nothing there until the end)."""

from __future__ import annotations

import re

import pytest

from dsm_lightning.app.progress import LogProgress
from tests.lightning_helpers import make_image_folder, tiny_classifier, tiny_data, trainer


@pytest.mark.parametrize("stage", ["validate", "predict"])
def test_progress_lines_name_the_stage_batches_and_time_left(tmp_path, capsys, stage):
    data = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)  # 12 images, batches of 4
    run = trainer(callbacks=[LogProgress(every=1e-9)])
    getattr(run, stage)(tiny_classifier(), datamodule=tiny_data(data, predict_dir=str(data)))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{stage}: batch")]
    assert len(lines) == 3 and lines[0].startswith(f"{stage}: batch 1/3 (33%), elapsed 0:00:0")
    assert re.search(r"about \d:\d\d:\d\d left$", lines[-1])


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="positive number of seconds"):
        LogProgress(every=0)


def test_the_cli_logs_progress_when_stdout_is_not_a_terminal(tmp_path):
    from dsm_lightning.app.cli import cli
    from tests.test_cli_writer import cli_args

    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    args = [a for a in cli_args(tmp_path, data, tmp_path / "p.csv") if "enable_progress_bar" not in a]
    run = cli(["predict", *args])  # pytest captures stdout: not a terminal
    assert any(isinstance(c, LogProgress) for c in run.trainer.callbacks)
    quiet = cli(["predict", *args, "--trainer.enable_progress_bar=false", "--writer.overwrite=true"])
    assert not any(isinstance(c, LogProgress) for c in quiet.trainer.callbacks), "no progress asked, none shown"
