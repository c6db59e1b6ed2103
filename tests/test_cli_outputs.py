"""The ``fasthist`` command's output folder and Ctrl-C: the folder is
checked before any work, a run's outputs replace the previous run's all at once or not at
all, Ctrl-C at any moment ends with one line and status 130, one folder per task by
default, help text and timings that say what they mean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasthist.cli import main
from fasthist.cli.app import build_parser

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EPS_FILES = ["adaptability.png", "eps_range.json", "histograms.png"]


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def contents(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder``, the JSON results without their timings (which differ
    between two runs of the same command)."""
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.suffix == ".json" and data != b"{}":
            d = json.loads(data)
            d.pop("seconds", None)
            data = json.dumps(d).encode()
        out[p.name] = data
    return out


def no_work(*args, **kwargs):
    raise AssertionError("work started before the output folder was checked")


# -- the output folder is checked and created before any work --------------------
@pytest.mark.parametrize("cmd", [["eps-range"], ["sweep", "--seeds", "1"]])
def test_out_is_a_file_fails_before_any_work(cmd, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fasthist.tasks.get_task", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        rc, _, err = run([*cmd, "--quiet", "--out", str(out)], capsys)
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "--out" in lines[0] and str(out) in lines[0]
    assert blocker.read_text() == "x"


def test_out_is_checked_before_any_work_and_created_after_the_arguments(tmp_path, capsys, monkeypatch):
    """A missing --out is checked (creatable) first, and created only once every argument
    is known to be valid (``--exclude`` needs the model's names): a run that stops before
    leaves no folder behind."""
    monkeypatch.setattr("fasthist.tasks.get_task", no_work)
    out = tmp_path / "a" / "b"
    rc, _, err = run(["eps-range", "--quiet", "--out", str(out)], capsys)
    assert rc == 1 and "work started" in err  # the work was reached, after the folder was checked
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_not_writable_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fasthist.tasks.get_task", no_work)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run(["eps-range", "--quiet", "--out", str(ro)], capsys)
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "not writable" in err


# -- all new, or the previous run's left as they were -----------------------------
@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """A finished eps-range run (seed 0) and the outputs of the same run at seed 1."""
    root = tmp_path_factory.mktemp("prev")
    for seed in (0, 1):
        assert main(["eps-range", "--steps", "2", "--quiet", "--seed", str(seed), "--out", str(root / str(seed))]) == 0
    return contents(root / "0"), contents(root / "1")


def fresh(tmp_path: Path, files: dict[str, bytes]) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "where",
    [
        "fasthist.cli.output.json_text",  # while the JSON is being written
        "fasthist.plot.histograms",  # the JSON done, the first figure being drawn
        "fasthist.plot.adaptability",  # the JSON and one figure done
    ],
)
def test_interrupted_while_writing_leaves_the_previous_run(where, previous, tmp_path, capsys, monkeypatch):
    old, _ = previous
    out = fresh(tmp_path, old)
    monkeypatch.setattr(where, interrupt)
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--out", str(out)], capsys)
    assert rc == 130 and err.strip().splitlines() == ["fasthist: interrupted"]
    assert contents(out) == old  # nothing new, nothing half-written, no staging folder left


def test_ctrl_c_mid_figure_waits_for_the_figure_then_interrupts(previous, tmp_path, capsys, monkeypatch):
    """A real SIGINT while matplotlib lays out a figure: the figure is finished first (an
    interrupt inside matplotlib can leave its state broken and end in an unrelated error),
    then the run stops with 130 and the previous run's files."""
    import fasthist.plot

    old, _ = previous
    out = fresh(tmp_path, old)
    real = fasthist.plot.histograms
    finished = []

    def histograms(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered at once to the main thread, mid-draw
        result = real(*args, **kwargs)
        finished.append(True)
        return result

    monkeypatch.setattr("fasthist.plot.histograms", histograms)
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--out", str(out)], capsys)
    assert finished == [True]
    assert rc == 130 and err.strip().splitlines() == ["fasthist: interrupted"]
    assert contents(out) == old


def test_an_error_raised_from_an_interrupt_is_an_interrupt(tmp_path, capsys, monkeypatch):
    """A library that turns a KeyboardInterrupt into its own error still ends as Ctrl-C."""

    def wrapped(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ValueError("Invalid affine transformation matrix") from e

    monkeypatch.setattr("fasthist.tasks.get_task", wrapped)
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--out", str(tmp_path)], capsys)
    assert rc == 130 and err.strip().splitlines() == ["fasthist: interrupted"]


def test_interrupt_during_the_renames_is_ignored_the_run_is_complete(previous, tmp_path, capsys, monkeypatch):
    old, new = previous
    out = fresh(tmp_path, old)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the first and second rename
        real(src, dst)

    monkeypatch.setattr("fasthist.cli.output.os.replace", replace)
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--out", str(out)], capsys)
    assert rc == 0 and "interrupted" not in err
    assert len(calls) == 6 and contents(out) == new  # 3 old files moved aside, 3 new moved in


def test_no_figures_removes_the_previous_runs_figures(previous, tmp_path, capsys):
    old, new = previous
    out = fresh(tmp_path, old)
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--no-figures", "--out", str(out)], capsys)
    assert rc == 0, err
    assert contents(out) == {"eps_range.json": new["eps_range.json"]}


def test_other_files_in_the_folder_are_left_alone(previous, tmp_path, capsys):
    old, new = previous
    out = fresh(tmp_path, {**old, "notes.txt": b"mine", "sweep.json": b"{}"})
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--out", str(out)], capsys)
    assert rc == 0, err
    assert contents(out) == {**new, "notes.txt": b"mine", "sweep.json": b"{}"}


# -- Ctrl-C at any moment: one line, status 130 -----------------------------------
@pytest.mark.parametrize(
    "where",
    ["fasthist.tasks.get_task", "fasthist.estimate.eps_pass", "fasthist.cli.app.build_parser"],
)
def test_interrupt_in_process_is_one_line(where, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(where, interrupt)
    rc, out, err = run(["eps-range", "--steps", "2", "--quiet", "--out", str(tmp_path)], capsys)
    assert rc == 130 and err.strip().splitlines() == ["fasthist: interrupted"]


# The console script is `from fasthist.cli import main; sys.exit(main())`: this runs exactly
# that, with a line between the two saying the command's code is up. What happens before it
# is out of the command's hands: Python's own start-up, and locating and executing the
# entry module (about 12 ms, `python -X importtime -c "import fasthist.cli"`; no torch, see
# test_entry_point_imports_nothing_heavy), where no handler can exist yet and a Ctrl-C ends
# as any Python program's does. From the call of main() on, torch's import included, every
# moment is the command's.
LAUNCH = "import sys; from fasthist.cli import main; print('up', flush=True); sys.exit(main())"


def launch(argv, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FASTHIST_DEBUG", None)
    cmd = [sys.executable, "-c", LAUNCH, *argv]
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "up\n"
    return p


def test_entry_point_imports_nothing_heavy():
    """The entry module is all that runs before main() can take Ctrl-C: it imports no torch,
    numpy or matplotlib (each a second or more of start-up with no handler)."""
    code = "import sys, fasthist.cli; print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out


def test_ctrl_c_at_several_moments(previous, tmp_path):
    old, _ = previous
    argv = ["eps-range", "--steps", "2", "--quiet", "--seed", "1"]
    t0 = time.perf_counter()
    full = launch([*argv, "--out", str(tmp_path / "full")], tmp_path)
    assert full.wait(timeout=300) == 0, full.stderr.read()
    total = time.perf_counter() - t0
    new = contents(tmp_path / "full")
    # from the first milliseconds (imports) through the pass to the end (figures, renames);
    # the moments are few because each costs a start-up of torch
    for i, delay in enumerate([0.0, 0.2, total * 0.5, total * 0.9]):
        (tmp_path / str(i)).mkdir()
        out = fresh(tmp_path / str(i), old)
        p = launch([*argv, "--out", str(out)], tmp_path)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=300)
        assert p.returncode in (0, 130), (delay, p.returncode, err)
        assert "Traceback" not in err, (delay, err)
        if p.returncode == 130:
            assert err.strip().splitlines()[-1] == "fasthist: interrupted", (delay, err)
        got = contents(out)
        assert got in (old, new), (delay, {k: got[k] == old.get(k) for k in got})


# -- one folder per task by default ------------------------------------------------
def test_default_out_is_one_folder_per_task(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for task in ("digits", "charlm"):
        rc, out, err = run(["eps-range", "--task", task, "--steps", "1", "--quiet", "--no-figures"], capsys)
        assert rc == 0, err
        assert str(Path("fasthist-out") / task / "eps_range.json") in out
    for task in ("digits", "charlm"):
        assert json.loads((tmp_path / "fasthist-out" / task / "eps_range.json").read_text())["task"] == task


# -- help text and timings ----------------------------------------------------------
def test_help_has_no_doubled_percent_signs():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse has no public accessor
    texts = [parser.format_help(), *(p.format_help() for p in sub.choices.values())]
    for text in texts:
        assert "%%" not in text
    assert "2%/98%" in sub.choices["eps-range"].format_help()


def test_seconds_in_json_is_what_the_console_says(tmp_path, capsys):
    rc, out, err = run(["eps-range", "--steps", "2", "--quiet", "--no-figures", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "eps_range.json").read_text())
    line = next(s for s in out.splitlines() if s.startswith("ε range computed in"))
    assert line.startswith(f"ε range computed in {data['seconds']:.2f} s")
    assert "in all" in out.splitlines()[-1]  # the closing line says it counts everything


# -- the outputs of a run, by a hostile user ---------------------------------------------------
@pytest.mark.parametrize("cmd", [["eps-range"], ["sweep", "--seeds", "1"]])
def test_empty_out_is_refused(cmd, tmp_path, capsys, monkeypatch):
    """``--out ""`` would be the current folder, where a run replaces or removes files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fasthist.tasks.get_task", no_work)
    (tmp_path / "eps_range.json").write_text("mine")
    for out in ("", "  "):
        rc, _, err = run([*cmd, "--quiet", "--out", out], capsys)
        assert rc == 2 and "invalid output folder" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["eps_range.json"]
    assert (tmp_path / "eps_range.json").read_text() == "mine"


def test_commit_is_all_or_nothing_when_a_destination_is_a_folder(previous, tmp_path, capsys):
    old, _ = previous
    out = fresh(tmp_path, {k: v for k, v in old.items() if k != "histograms.png"})
    (out / "histograms.png").mkdir()
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--out", str(out)], capsys)
    assert rc == 1 and "histograms.png" in err and "folder" in err, err
    assert sorted(p.name for p in out.iterdir()) == EPS_FILES  # no staging folder left
    (out / "histograms.png").rmdir()
    assert contents(out) == {k: v for k, v in old.items() if k != "histograms.png"}  # nothing replaced


def test_commit_puts_the_previous_files_back_when_a_rename_fails(previous, tmp_path, capsys, monkeypatch):
    old, _ = previous
    out = fresh(tmp_path, old)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 5:  # the second new file moving in
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr("fasthist.cli.output.os.replace", replace)
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--out", str(out)], capsys)
    assert rc == 1 and "No space left" in err, err
    assert contents(out) == old


def signal_self(sig):
    def fn(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler runs at the next bytecode; never reached

    return fn


def test_sigterm_while_drawing_figures_leaves_the_previous_run(previous, tmp_path, capsys, monkeypatch):
    old, _ = previous
    out = fresh(tmp_path, old)
    monkeypatch.setattr("fasthist.plot.adaptability", signal_self(signal.SIGTERM))
    rc, _, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--out", str(out)], capsys)
    assert rc == 143 and err.strip().splitlines() == ["fasthist: terminated"]
    assert contents(out) == old  # no staging folder either
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored for an in-process caller


def test_ctrl_c_right_after_wrote_is_a_complete_run(previous, tmp_path, capsys, monkeypatch):
    from fasthist.cli import eps_range

    _, new = previous
    out = tmp_path / "out"
    real = eps_range.report_written

    def then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(eps_range, "report_written", then_interrupt)
    rc, stdout, err = run(["eps-range", "--steps", "2", "--quiet", "--seed", "1", "--out", str(out)], capsys)
    assert rc == 0 and "interrupted" not in err and "wrote" in stdout
    assert contents(out) == new
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_bad_exclude_writes_nothing(tmp_path, capsys):
    out = tmp_path / "new"
    rc, _, err = run(["eps-range", "--quiet", "--exclude", "no.such.*", "--out", str(out)], capsys)
    assert rc == 2 and "--exclude" in err, err
    assert not out.exists()


@pytest.mark.parametrize("seconds", [0.0, 1.0])
def test_a_kernel_build_is_announced_before_the_run(seconds, tmp_path, capsys, monkeypatch):
    """The first use builds the compiled CPU kernel (55 s on 2 cores): one line says so, before the
    pass, instead of a progress bar that stalls; a cached library loads silently."""
    from fasthist import csrc

    calls = []

    def slow_load():
        calls.append(seconds)
        time.sleep(seconds)
        return True

    monkeypatch.setenv("FASTHIST_CPU_KERNEL", "1")
    monkeypatch.setattr(csrc, "available", slow_load)
    rc, _, err = run(["eps-range", "--steps", "1", "--quiet", "--no-figures", "--out", str(tmp_path)], capsys)
    assert rc == 0 and calls
    building = "building fasthist's CPU kernel (first use, about a minute on 2 cores)"
    assert (building in err) == (seconds > 0), err
