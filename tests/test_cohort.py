"""Many workers, one cohort: each slide claimed and computed once, a cohort summary, unusable folders named.

Labs run a cohort as their cluster lets them: several `wsiproc run` processes over the same inputs and one
output folder (SLURM array jobs, two terminals, machines sharing an NFS folder). These tests start real
`wsiproc run` processes, kill and interrupt them, and give them a full disk and a read-only folder (mounted
for the test: the tests run as root, for whom chmod alone makes nothing read-only; skipped, with the reason,
where mounting is not permitted). Inputs are six 400-px crops of real H&E, run with the tiny dark-pixel
model of conftest: half a second each, so the processes' work interleaves.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import wait_for
from PIL import Image

from wsiproc.cohort import claims, summary
from wsiproc.cohort.claims import HOST, Claim

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300  # TensorFlow's start and six small slides, on a busy 2-core machine


@pytest.fixture()
def cohort(tmp_path: Path, shared_data: Path) -> list[Path]:
    """Six 400 × 400 px crops of real H&E (crc-dev), as PNG: run at --mpp 0.5, one tile each."""
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for i in range(1, 7):
        path = folder / f"case{i}.png"
        Image.open(shared_data / "crc-dev" / "images" / f"img{i}.png").convert("RGB").crop((0, 0, 400, 400)).save(path)
        paths.append(path)
    return paths


def _args(inputs: list[Path], out: Path, model: Path) -> list[str]:
    return ["run", *map(str, inputs), "--mpp", "0.5", "--out", str(out), "--model", str(model), "--quiet"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """`wsiproc run` as a process of its own (own session: a kill reaches it and nothing else); output to `log`."""
    with open(log.with_suffix(".out"), "w") as stdout, open(log.with_suffix(".err"), "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "wsiproc.cli", *args], cwd=REPO, stdout=stdout, stderr=stderr,
                                start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of a process from `_start`."""
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return code, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def _run(args: list[str], log: Path) -> tuple[int, str, str]:
    return _finish(_start(args, log), log)


def _statuses(stdout: str, inputs: list[Path]) -> dict[Path, str]:
    """Each input's status in a process's summary table."""
    found = {}
    for line in stdout.splitlines():
        for path in inputs:
            if line.startswith(f"{path} "):
                found[path] = line[len(str(path)) :].split()[0]
    return found


def _bookkeeping_left(out: Path) -> list[str]:
    """Claims, the summary lock, temporary files: none may outlive a run that ended normally."""
    return [p.name for p in out.iterdir() if p.name.endswith((".claim", ".lock", ".partial", ".stale"))]


def _assert_complete(out: Path, inputs: list[Path], model: Path) -> None:
    from wsiproc.cohort.batch import is_complete
    from wsiproc.config import RunConfig
    from wsiproc.io.files import file_sha256

    cfg, sha = RunConfig(model_path=str(model), mpp=0.5), file_sha256(model)
    assert all(is_complete(out, p.stem, p, cfg, sha) for p in inputs), "some outputs are incomplete"
    assert not _bookkeeping_left(out)


def _summary_rows(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == list(summary.COLUMNS)
    return rows


# ------------------------------------------------------------------------------------------ many processes


def _two_workers(out: Path, cohort: list[Path], model: Path, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
    """Two `wsiproc run` processes started together on the same six inputs and folder: each slide computed once."""
    procs = [_start([*_args(cohort, out, model), *extra], tmp_path / f"worker{i}") for i in (1, 2)]
    finished = [_finish(proc, tmp_path / f"worker{i}") for i, proc in zip((1, 2), procs)]
    for code, _, stderr in finished:
        assert code == 0, stderr
        assert "Traceback" not in stderr
    tables = [_statuses(stdout, cohort) for _, stdout, _ in finished]
    for path in cohort:
        seen = sorted(table[path] for table in tables)
        assert seen.count("done") == 1, f"{path.name} computed {seen.count('done')} times ({seen})"
        assert set(seen) <= {"done", "claimed", "skipped"}, seen
    _assert_complete(out, cohort, model)

    rows = _summary_rows(out)
    assert sorted(row["input"] for row in rows) == sorted(map(str, cohort))  # every input, once
    for row in rows:
        record = json.loads((out / f"{Path(row['input']).stem}.json").read_text())
        assert row["status"] in ("done", "skipped") and int(row["nuclei"]) == record["nuclei"] > 0
        assert row["model_sha256"] == record["model"]["sha256"]
        tissue = float(row["tissue_mm2"])
        assert 0 < tissue <= 0.04 + 1e-9  # 400 px at 0.5 µm/px: 0.04 mm² at most
        assert float(row["nuclei_per_mm2"]) == pytest.approx(record["nuclei"] / tissue, rel=0.01)
        assert float(row["seconds"]) > 0


def test_two_processes_on_one_cohort_compute_every_slide_once(tmp_path: Path, cohort: list[Path], tiny_model: Path) -> None:
    _two_workers(tmp_path / "out", cohort, tiny_model, tmp_path)


def test_two_clients_of_one_dask_cluster_compute_every_slide_once(tmp_path: Path, cohort: list[Path], tiny_model: Path) -> None:
    """The distributed mode: the claim is taken by the client, which writes the outputs; workers only compute tiles."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        _two_workers(tmp_path / "out", cohort, tiny_model, tmp_path, ("--scheduler", cluster.scheduler_address))


# ------------------------------------------------------------------------------------------ interrupted processes


def test_interrupted_runs_leave_at_most_a_stale_claim_which_the_next_run_takes_over(tmp_path: Path, cohort: list[Path], tiny_model: Path) -> None:
    out = tmp_path / "out"
    args = _args(cohort, out, tiny_model)

    # SIGTERM (scancel, a SLURM time limit): stopped like Ctrl-C, the claim released, exit 128 + 15.
    proc = _start(args, tmp_path / "terminated")
    claim = summary.claim_path(out, cohort[1].stem)
    wait_for(proc, claim.name, claim.exists, RUN_TIMEOUT_S)
    proc.send_signal(signal.SIGTERM)
    code, _, stderr = _finish(proc, tmp_path / "terminated")
    assert code == 143 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not _bookkeeping_left(out)

    # SIGKILL (the OOM killer, a node failure): nothing runs, the claim stays; its process is gone, so it is stale.
    proc = _start(args, tmp_path / "killed")
    claim = summary.claim_path(out, cohort[3].stem)
    wait_for(proc, claim.name, claim.exists, RUN_TIMEOUT_S)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = Claim.read(claim)
    assert left is not None and left.owner == f"{HOST}:{proc.pid}", "the kill landed after the slide was finished"
    assert left.stale_reason() == "its process is gone"
    [row] = [r for r in summary.cohort_rows(out) if r["input"] == str(cohort[3])]
    assert row["status"] == "claimed" and "stale" in row["detail"]

    code, stdout, stderr = _run(args, tmp_path / "rerun")
    assert code == 0, stderr
    assert f"{cohort[3]}: warning: took over the stale claim of {HOST}:{proc.pid}" in stderr
    assert _statuses(stdout, cohort)[cohort[3]] == "done"
    _assert_complete(out, cohort, tiny_model)
    assert sorted(row["input"] for row in _summary_rows(out)) == sorted(map(str, cohort))


# ------------------------------------------------------------------------------------------ unusable output folders


@contextlib.contextmanager
def _mounted(target: Path, *mount_args: str, read_only: bool = False) -> Iterator[None]:
    """`mount ARGS target` for the block; skips the test, saying why, where mounting is not permitted."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a full or read-only folder")
    done = subprocess.run(["mount", *mount_args, str(target)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mounting is not permitted here ({done.stderr.strip()}); needs root or CAP_SYS_ADMIN")
    try:
        if read_only:
            ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
            if ro.returncode:
                pytest.skip(f"cannot remount read-only ({ro.stderr.strip()})")
        yield
    finally:
        subprocess.run(["umount", str(target)], check=False)


def _lines_naming(text: str, folder: Path) -> list[str]:
    return [line for line in text.splitlines() if str(folder) in line]


def test_a_full_disk_stops_the_batch_with_one_line_and_leaves_no_partial_file(tmp_path: Path, cohort: list[Path], tiny_model: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with _mounted(out, "-t", "tmpfs", "-o", "size=256k", "tmpfs"):  # one slide's outputs are about 500 KiB
        code, stdout, stderr = _run(_args(cohort[:3], out, tiny_model), tmp_path / "full")
        assert code == 1, stderr
        [line] = _lines_naming(stderr, out)
        assert line.startswith(f"{out}: no space left on device") and "batch stopped" in line, line
        assert "Traceback" not in stderr
        assert _statuses(stdout, cohort[:3]) == {cohort[0]: "failed", cohort[1]: "not", cohort[2]: "not"}  # "not run"
        assert not _bookkeeping_left(out), "temporary files or claims left behind"
        assert not [p.name for p in out.iterdir() if p.name.startswith(cohort[0].stem)], "part of the slide's outputs left"
        [row] = _summary_rows(out)  # the slide's files were removed, so the reason could be noted
        assert row["status"] == "failed" and "no space left on device" in row["detail"]


def test_a_read_only_output_folder_is_named_before_any_slide(tmp_path: Path, cohort: list[Path], tiny_model: Path) -> None:
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    with _mounted(out, "--bind", str(source), read_only=True):
        code, stdout, stderr = _run(_args(cohort[:2], out, tiny_model), tmp_path / "readonly")
        assert code == 1, stderr
        assert _lines_naming(stderr, out) == [f"{out}: cannot write there: read-only file system"]
        assert "Traceback" not in stderr and not stdout.strip()  # stopped before the first slide: no table
    assert not list(source.iterdir())


def test_the_folder_is_blamed_only_for_its_own_refusals(tmp_path: Path) -> None:
    from wsiproc.errors import folder_problem

    out = tmp_path / "out"
    assert folder_problem(OSError(errno.ENOSPC, "No space left on device"), out) == "no space left on device"
    assert folder_problem(PermissionError(errno.EACCES, "Permission denied", str(out / "a.csv")), out) == "permission denied"
    assert folder_problem(PermissionError(errno.EACCES, "Permission denied", "/slides/a.svs"), out) is None  # an input
    assert folder_problem(OSError(errno.ENOSPC, "No space left on device", "/tmp/spill"), out) is None  # elsewhere
    wrapped = ValueError("cannot write the QC picture")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert folder_problem(wrapped, out) == "read-only file system"
    assert folder_problem(ValueError("not a slide"), out) is None


# ------------------------------------------------------------------------------------------ claims


@pytest.fixture()
def other_process() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _claim_of(proc: subprocess.Popen, path: Path) -> Claim:
    import psutil

    claim = Claim(HOST, proc.pid, time.time(), token="theirs", pid_started=psutil.Process(proc.pid).create_time(),
                  boot_time=psutil.boot_time(), input="slide.svs", path=path)
    path.write_text(claim.to_json())
    return claim


def test_a_live_claim_is_respected_and_a_dead_processs_is_taken_over(tmp_path: Path, other_process: subprocess.Popen) -> None:
    path = tmp_path / ".slide.claim"
    _claim_of(other_process, path)
    attempt = claims.acquire(path)
    assert attempt.claim is None and attempt.holder.owner == f"{HOST}:{other_process.pid}"
    other_process.kill()
    other_process.wait()
    attempt = claims.acquire(path, "slide.svs")
    assert attempt.claim is not None and attempt.claim.pid == os.getpid()
    assert attempt.replaced.pid == other_process.pid and attempt.replaced_because == "its process is gone"
    assert Claim.read(path).token == attempt.claim.token
    claims.release(attempt.claim)
    assert not list(tmp_path.iterdir())


def test_a_reused_pid_and_other_hosts_claims(tmp_path: Path) -> None:
    path = tmp_path / ".slide.claim"
    mine = Claim.new(path)
    reused = Claim(HOST, os.getpid(), time.time(), token="old", pid_started=mine.pid_started - 100, path=path)
    assert reused.stale_reason() == "its process is gone (the pid now belongs to another one)"
    elsewhere = Claim("another-host", 4242, time.time() - 100, token="x", path=path)
    path.write_text(elsewhere.to_json())
    assert claims.acquire(path, timeout_s=1000).holder.owner == "another-host:4242"  # cannot be seen: only age tells
    attempt = claims.acquire(path, timeout_s=50)
    assert attempt.claim is not None and "another host" in attempt.replaced_because


def test_an_unfilled_claim_counts_as_live_for_a_minute(tmp_path: Path) -> None:
    path = tmp_path / ".slide.claim"
    path.touch()  # its holder was killed between creating and filling it, or is filling it now
    assert claims.acquire(path).holder.owner == "an unknown process"
    old = time.time() - claims.UNREADABLE_GRACE_S - 5
    os.utime(path, (old, old))
    assert claims.acquire(path).claim is not None


def test_a_takeover_never_removes_a_fresh_claim(tmp_path: Path, other_process: subprocess.Popen) -> None:
    """Two processes found the same claim stale; the faster one already replaced it: the slower one must not
    remove the new claim."""
    path = tmp_path / ".slide.claim"
    stale = Claim("another-host", 1, 0.0, token="stale", path=path)
    fresh = _claim_of(other_process, path)  # what the file holds by the time the slower process acts
    assert not claims._remove_stale(stale)
    assert Claim.read(path).token == fresh.token
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
