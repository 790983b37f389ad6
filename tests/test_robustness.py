"""Robustness: damaged files, killed runs, corrupt tiles and non-H&E slides.

What a lab relies on when a batch runs unattended overnight:
- a damaged file (flipped bytes, cut short, a broken tile table) ends as "done" or "failed" with a one-line
  reason, quickly; it never hangs the batch, crashes the process or leaves half-written files;
- a run killed at any moment (SIGKILL, power cut) and run again ends with exactly the files of a run that
  was never interrupted; Ctrl-C stops cleanly with exit code 130;
- one undecodable tile in a readable slide is skipped and reported, or fails the slide under --strict;
- a fluorescence slide is processed but flagged as not brightfield H&E.

The damaged files are seeded mutants of the real slides in ../shared/data/slides, each run through the real
batch runner in a child process, so that a segfault or a hang in a C library (OpenSlide, libtiff, libjpeg,
OpenJPEG) is caught and named instead of taking pytest down. Usage, by hand:

    pytest tests/test_robustness.py              # the fast part: a sample of mutants
    pytest tests/test_robustness.py -m slow -s   # >= 200 mutants, with a summary
"""
from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import wait_for as _wait_for

REPO = Path(__file__).resolve().parents[1]
OUTPUT_SUFFIXES = (".csv", ".geojson", "_density.tiff", "_density.png", "_qc.png", ".json")

# ------------------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="session")
def tiny_predictor(tiny_model: Path):
    from wsiproc.detection.inference import Predictor

    return Predictor(tiny_model)


def test_the_tiny_model_finds_dark_nuclei_and_not_pale_stroma(tiny_predictor) -> None:
    tiles = np.full((2, 16, 16, 3), 220, np.uint8)  # pale eosin
    tiles[1, 4:12, 4:12] = (70, 40, 110)  # a dark purple nucleus
    conf = tiny_predictor(tiles)
    assert conf.shape == (2, 16, 16)
    inside = conf[:, 1:-1, 1:-1]  # the outermost pixels see zero padding (black); tiles carry a halo for that
    assert inside[0].max() < 0.5 and inside[1, 5:9, 5:9].min() > 0.5


# ------------------------------------------------------------------------------------------ mutants

#: The slides that are mutated, with the pixel size every mutant is run at. Given rather than read from the
#: file: a flipped digit in a stored pixel size is a valid file that asks for up to 100× the tiles, so a
#: mutant's run time would depend on the size it claims instead of on the damage to its structure.
FUZZ_SOURCES = {
    "CMU-1-Small-Region.svs": 0.499,  # Aperio SVS, JPEG tiles, 1 level + thumbnail/label/macro
    "OS-1-detail.ome.tif": 0.2271,  # OME-TIFF, JPEG tiles: tiffslide
    "openslide-fixtures/small.svs": 0.499,  # 16 × 16 SVS, one tile
    "openslide-fixtures/boxes.tiff": 0.5,  # generic pyramidal TIFF, deflate tiles, 4 levels
    "monusac/A9K0_3.svs": 0.1945,  # Aperio SVS, JPEG 2000 tiles
}
MUTATIONS = ("flip", "flip_header", "truncate", "tile_offsets", "tile_bytecounts")
KEEPER_SELF_TEST = ("_segfault", "_hang")  # not damage: what the child does to itself in the keeper's own test
HEADER_BYTES = 64 * 1024  # where TIFF headers and first IFDs live
#: Seconds a mutant may take. A clean run of the largest source (CMU-1-Small-Region, 108 tiles) takes ~4 s of
#: CPU; the margin is for a machine busy with other work.
MUTANT_TIMEOUT_S = 90
CHILD_START_TIMEOUT_S = 300  # importing TensorFlow and loading the model, on a busy machine


@dataclass(frozen=True)
class Mutant:
    source: str  # a key of FUZZ_SOURCES
    kind: str  # one of MUTATIONS (or KEEPER_SELF_TEST)
    index: int  # the seed, with source and kind

    @property
    def name(self) -> str:
        stem, _, suffixes = Path(self.source).name.partition(".")  # keeps ".ome.tif" whole
        return f"{stem}-{self.kind}-{self.index:03d}.{suffixes}"

    @property
    def mpp(self) -> float:
        return FUZZ_SOURCES[self.source]


def _page0_table(path: Path, names: tuple[str, str]) -> tuple[int, int, int, str]:
    """(file offset, count, item size, byte order) of page 0's TileOffsets/StripOffsets-like tag."""
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        tag = tags.get(names[0]) or tags.get(names[1])
        return tag.valueoffset, tag.count, tag.valuebytecount // tag.count, tif.byteorder


def mutate(original: Path, mutant: Mutant) -> bytes:
    """The bytes of `mutant`: deterministic for its (source, kind, index)."""
    rng = random.Random(f"{mutant.source}/{mutant.kind}/{mutant.index}")
    data = bytearray(original.read_bytes())
    if mutant.kind in ("flip", "flip_header"):
        span = len(data) if mutant.kind == "flip" else min(len(data), HEADER_BYTES)
        for _ in range(rng.randint(1, 50)):
            data[rng.randrange(span)] ^= rng.randint(1, 255)
    elif mutant.kind == "truncate":
        del data[rng.randrange(len(data)):]
    else:
        names = ("TileOffsets", "StripOffsets") if mutant.kind == "tile_offsets" else ("TileByteCounts", "StripByteCounts")
        at, count, size, byteorder = _page0_table(original, names)
        fmt = byteorder + {2: "H", 4: "I", 8: "Q"}[size]
        entries = [struct.unpack_from(fmt, data, at + i * size)[0] for i in range(count)]
        largest = (1 << (8 * size)) - 1
        for i in rng.sample(range(count), rng.randint(1, min(count, 8))):
            if mutant.kind == "tile_offsets":
                candidates = [0, largest, len(data) - 1, len(data) + rng.randrange(1 << 20), rng.randrange(len(data)), rng.choice(entries)]
            else:
                candidates = [0, 1, largest, rng.randrange(1 << 24), entries[i] // 2, entries[i] * 3]
            struct.pack_into(fmt, data, at + i * size, min(rng.choice(candidates), largest))
    return bytes(data)


def fast_sample() -> list[Mutant]:
    """Every source and every kind of damage, cheap ones: the large slide only where it fails at once."""
    return [
        Mutant("openslide-fixtures/small.svs", "flip_header", 0),
        Mutant("openslide-fixtures/small.svs", "tile_offsets", 0),
        Mutant("openslide-fixtures/boxes.tiff", "tile_bytecounts", 0),
        Mutant("openslide-fixtures/boxes.tiff", "truncate", 0),
        Mutant("OS-1-detail.ome.tif", "flip", 0),
        Mutant("OS-1-detail.ome.tif", "tile_offsets", 0),
        Mutant("monusac/A9K0_3.svs", "flip_header", 0),
        Mutant("monusac/A9K0_3.svs", "tile_bytecounts", 0),
        Mutant("OS-1-detail.ome.tif", "truncate", 7),
        Mutant("CMU-1-Small-Region.svs", "truncate", 0),
    ]


def full_sample() -> list[Mutant]:
    """210 mutants: every kind in turn per source, fewer of the one large slide."""
    per_source = {"CMU-1-Small-Region.svs": 30, "OS-1-detail.ome.tif": 45, "openslide-fixtures/small.svs": 45,
                  "openslide-fixtures/boxes.tiff": 45, "monusac/A9K0_3.svs": 45}
    return [Mutant(source, MUTATIONS[i % len(MUTATIONS)], i) for source, n in per_source.items() for i in range(n)]


# ------------------------------------------------------------------------- the child process and its keeper


@dataclass
class FuzzResult:
    mutant: Mutant
    status: str  # "done" or "failed" (from run_batch), or "hung" / "crashed" (the child had to be replaced)
    detail: str
    seconds: float
    files: list[str]  # what the mutant's output folder holds, dot files included
    outputs: list[str]  # the files its run record lists (a "done" mutant's)
    failed_tiles: int = 0  # tiles skipped as undecodable, from the run record


def _child_main(jobs_file: str, model: str, slides: str, work: str) -> None:
    """The child: runs mutants one after the other, one JSON line before and after each, on the original stdout.

    Anything else written to stdout (by Python or a C library) goes to stderr, so the protocol stays clean.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    mutants = [Mutant(**job) for job in json.loads(Path(jobs_file).read_text())]
    if any(m.kind in MUTATIONS for m in mutants):  # the keeper's own test needs no model
        from wsiproc.cohort.batch import run_batch
        from wsiproc.config import RunConfig
        from wsiproc.detection.inference import Predictor

        predictor = Predictor(model)
    for mutant in mutants:
        print(json.dumps({"start": mutant.name}), file=protocol)
        if mutant.kind == "_segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if mutant.kind == "_hang":
            time.sleep(3600)
        path = Path(work) / "mutants" / mutant.name
        path.write_bytes(mutate(Path(slides) / mutant.source, mutant))
        cfg = RunConfig(mpp=mutant.mpp, tile_px=256, tissue_mask=True)
        t0 = time.perf_counter()
        [outcome] = run_batch([path], Path(work) / "out" / mutant.name, cfg, predictor, echo=lambda line: None)
        print(json.dumps({"done": mutant.name, "status": outcome.status, "detail": outcome.detail,
                          "seconds": round(time.perf_counter() - t0, 3)}), file=protocol)
        path.unlink()


def run_mutants(mutants: list[Mutant], slides: Path, model: Path, work: Path, mutant_timeout_s: float = MUTANT_TIMEOUT_S,
                overall_timeout_s: float | None = None) -> list[FuzzResult]:
    """Each mutant through the real batch runner in a child process that is replaced after a hang or crash.

    A mutant that hangs or crashes the child is reported as such (its file stays in `work`/mutants to
    reproduce it) and the next child goes on with the rest. The whole run is bounded too (by default 20 s
    a mutant on average, plus the start): past it, fuzzing stops with an error naming the mutant running.
    """
    (work / "mutants").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    overall_timeout_s = overall_timeout_s or CHILD_START_TIMEOUT_S + 20 * len(mutants)
    deadline = time.monotonic() + overall_timeout_s
    pending, results = list(mutants), []
    while pending:
        jobs_file = work / "jobs.json"
        jobs_file.write_text(json.dumps([vars(m) for m in pending]))
        stderr_path = work / f"child-{len(results)}.stderr"
        with open(stderr_path, "wb") as stderr:
            child = subprocess.Popen([sys.executable, __file__, "fuzz-child", str(jobs_file), str(model), str(slides), str(work)],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_forward_lines, args=(child.stdout, lines), daemon=True).start()
        current, started, timeout = None, time.monotonic(), CHILD_START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, min(started + timeout, deadline) - time.monotonic()))
            except queue.Empty:  # a hang: name the mutant, replace the child
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"fuzzing passed its overall bound of {overall_timeout_s} s after {len(results)} of "
                                       f"{len(mutants)} mutants, in {current.name if current else 'the child start'}")
                if current is None:
                    raise RuntimeError(f"the fuzz child did not start within {timeout} s; see {stderr_path}")
                results.append(_result(work, current, "hung", f"no result after {timeout} s (kept: {work / 'mutants' / current.name})", timeout))
                pending.pop(0)
                break
            if line is None:  # the child ended
                code = child.wait()
                if current is None and pending:
                    raise RuntimeError(f"the fuzz child ended (exit {code}) before starting a mutant: {_tail(stderr_path)}")
                if current is not None:  # it died inside a mutant: a crash (segfault, abort, uncaught exception)
                    results.append(_result(work, current, "crashed", f"exit {code}: {_tail(stderr_path)} (kept: {work / 'mutants' / current.name})",
                                           time.monotonic() - started))
                    pending.pop(0)
                break
            message = json.loads(line)
            if "start" in message:
                current, started, timeout = pending[0], time.monotonic(), mutant_timeout_s
                assert message["start"] == current.name
            else:
                assert message["done"] == current.name
                results.append(_result(work, current, message["status"], message["detail"], message["seconds"]))
                pending.pop(0)
                current = None
    return results


def _forward_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # the child closed its stdout: it ended


def _result(work: Path, mutant: Mutant, status: str, detail: str, seconds: float) -> FuzzResult:
    out = work / "out" / mutant.name
    # The cohort table and the outcome note are bookkeeping, written for failed inputs too; claims and temporary
    # files stay listed: none may be left.
    files = sorted(p.name for p in out.iterdir() if p.name != "summary.csv" and not p.name.endswith(".outcome.json")) if out.is_dir() else []
    records = [json.loads(p.read_text()) for p in out.glob("[!.]*.json")] if status == "done" else []
    outputs = sorted(records[0]["outputs"].values()) if records else []
    failed_tiles = len(records[0]["stats"]["failed_tiles"]) if records else 0
    if status in ("done", "failed"):
        shutil.rmtree(out, ignore_errors=True)  # keep the disk small over hundreds of mutants
    return FuzzResult(mutant, status, detail, seconds, files, outputs, failed_tiles)


def _tail(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def check_fuzz_results(results: list[FuzzResult]) -> None:
    problems = []
    for r in results:
        stem = r.mutant.name.rsplit(".", 1)[0]
        if r.status not in ("done", "failed"):
            problems.append(f"{r.mutant.name}: {r.status} ({r.detail})")
        if r.status == "failed" and (not r.detail.strip() or "\n" in r.detail or "Traceback" in r.detail):
            problems.append(f"{r.mutant.name}: failure message is not one clear line: {r.detail!r}")
        if any(name.endswith("partial") for name in r.files):
            problems.append(f"{r.mutant.name}: temporary files left: {r.files}")
        if r.status == "done" and not r.files == r.outputs == sorted(stem + s for s in OUTPUT_SUFFIXES):
            problems.append(f"{r.mutant.name}: done, but the folder holds {r.files} and the record lists {r.outputs}")
        if r.status == "failed" and r.files:
            problems.append(f"{r.mutant.name}: failed, but left {r.files}")
    assert not problems, "\n".join(problems)


def fuzz_summary(results: list[FuzzResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("done", "failed", "hung", "crashed")}
    slowest = max(results, key=lambda r: r.seconds)
    lines = [f"{len(results)} mutants: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
             f"slowest: {slowest.mutant.name} {slowest.seconds:.1f} s ({slowest.status})"]
    lines += [f"  {r.mutant.name}: {r.status} {r.seconds:.1f} s {r.detail or ''}" + (f"({r.failed_tiles} tile(s) skipped)" if r.failed_tiles else "")
              for r in results]
    return "\n".join(lines)


def test_a_sample_of_damaged_slides_each_end_done_or_failed_with_one_clear_line(tmp_path: Path, slides: Path, tiny_model: Path) -> None:
    results = run_mutants(fast_sample(), slides, tiny_model, tmp_path)
    print(fuzz_summary(results))
    assert len(results) == len(fast_sample())
    check_fuzz_results(results)
    assert {r.status for r in results} == {"done", "failed"}  # the sample holds both outcomes


def test_the_keeper_names_a_mutant_that_crashed_or_hung_the_child_and_goes_on(tmp_path: Path, slides: Path, tiny_model: Path) -> None:
    mutants = [Mutant("openslide-fixtures/small.svs", kind, i) for i, kind in enumerate(["_segfault", "_hang", "_segfault"])]
    results = run_mutants(mutants, slides, tiny_model, tmp_path, mutant_timeout_s=2)
    assert [(r.mutant, r.status) for r in results] == list(zip(mutants, ["crashed", "hung", "crashed"]))
    assert results[0].detail.startswith(f"exit {-signal.SIGSEGV}")
    assert results[1].detail.startswith("no result after 2 s")
    with pytest.raises(AssertionError, match=r"small-_segfault-000\.svs: crashed"):
        check_fuzz_results(results)


@pytest.mark.slow
def test_hundreds_of_damaged_slides_each_end_done_or_failed_with_one_clear_line(tmp_path: Path, slides: Path, tiny_model: Path) -> None:
    mutants = full_sample()
    assert len(mutants) >= 200
    results = run_mutants(mutants, slides, tiny_model, tmp_path)
    print(fuzz_summary(results))
    assert len(results) == len(mutants)
    check_fuzz_results(results)


# ------------------------------------------------------------------------------------- killed and interrupted runs


def _three_inputs(tmp_path: Path, slides: Path) -> list[Path]:
    """Three small real H&E files (seconds each with the tiny model), copied so their paths are the test's own."""
    folder = tmp_path / "in"
    folder.mkdir()
    return [Path(shutil.copy(slides / name, folder)) for name in ("monusac/A9K0_1.svs", "monusac/A9K0_2.svs", "OS-1-detail.ome.tif")]


def _run_args(inputs: list[Path], out: Path, model: Path) -> list[str]:
    return ["run", *map(str, inputs), "--out", str(out), "--quiet", "--model", str(model)]


def _start_cli(args: list[str]) -> subprocess.Popen:
    """`wsiproc run` as its own process, which a test can kill or interrupt."""
    # SIGINT back to its default in the child: an ignored SIGINT is inherited (a shell's background job, or a
    # library in the test process), and Python then installs no KeyboardInterrupt handler: Ctrl-C would be untestable.
    return subprocess.Popen([sys.executable, "-m", "wsiproc.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """In the child before exec: SIGINT neither ignored nor blocked, whatever the test process inherited or set."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _writing(folder: Path) -> bool:
    """A temporary file exists: some output is being written at this moment."""
    return any(entry.name.endswith(".partial") for entry in os.scandir(folder))


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial")]


def _without_timings(record: dict) -> dict:
    """A run record less what measures time (the only fields two runs of the same input may differ in)."""
    record = dict(record)
    record.pop("timings_s")
    record["stats"] = {k: v for k, v in record["stats"].items() if not k.endswith("_s")}
    return record


def test_a_run_killed_mid_batch_and_rerun_gives_exactly_the_files_of_an_uninterrupted_run(tmp_path: Path, slides: Path, tiny_model: Path) -> None:
    from click.testing import CliRunner

    from wsiproc.cli import main

    inputs = _three_inputs(tmp_path, slides)
    killed, reference = tmp_path / "killed", tmp_path / "reference"

    proc = _start_cli(_run_args(inputs, killed, tiny_model))
    first_record = killed / f"{inputs[0].stem}.json"
    _wait_for(proc, first_record.name, first_record.exists)
    _wait_for(proc, "output being written after the first input", lambda: _writing(killed))
    os.killpg(proc.pid, signal.SIGKILL)  # in the middle of writing; no cleanup runs, as in a power cut or the OOM killer
    proc.wait()
    assert not (killed / f"{inputs[-1].stem}.json").exists(), "the kill landed after the batch had finished"
    # Whatever exists under a final name was written completely (atomic writes): it equals the reference below.
    after_kill = {p.name: p.read_bytes() for p in killed.iterdir() if not p.name.startswith(".") and p.name != "summary.csv"}

    # The rerun and the reference run in this process: the same command, without another TensorFlow start.
    rerun = CliRunner().invoke(main, _run_args(inputs, killed, tiny_model))
    assert rerun.exit_code == 0, rerun.output
    assert f"{inputs[0]}: already done" in rerun.output  # the finished input was not redone
    uninterrupted = CliRunner().invoke(main, _run_args(inputs, reference, tiny_model))
    assert uninterrupted.exit_code == 0, uninterrupted.output

    assert not _partials(tmp_path), "temporary files left behind"
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
    for stem in (p.stem for p in inputs):
        for suffix in (s for s in OUTPUT_SUFFIXES if s != ".json"):
            name = stem + suffix
            assert (killed / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs from the uninterrupted run"
        record, expected = (json.loads((folder / f"{stem}.json").read_text()) for folder in (killed, reference))
        assert _without_timings(record) == _without_timings(expected)
        assert record["nuclei"] > 0
    for name, data in after_kill.items():
        if not name.endswith(".json"):
            assert data == (reference / name).read_bytes(), f"{name} was left incomplete by the kill"


def test_ctrl_c_mid_batch_exits_130_and_leaves_only_complete_results(tmp_path: Path, slides: Path, tiny_model: Path) -> None:
    from wsiproc.cohort.batch import is_complete
    from wsiproc.config import RunConfig
    from wsiproc.io.files import file_sha256

    # A larger last input (30 tiles) keeps the run busy after the signal, even when the machine is slow to poll.
    inputs = [*_three_inputs(tmp_path, slides), Path(shutil.copy(slides / "CMU-1-Small-Region.svs", tmp_path / "in"))]
    out = tmp_path / "out"
    proc = _start_cli(_run_args(inputs, out, tiny_model))
    first_record = out / f"{inputs[0].stem}.json"
    _wait_for(proc, first_record.name, first_record.exists)
    _wait_for(proc, "output being written after the first input", lambda: _writing(out))
    proc.send_signal(signal.SIGINT)  # Ctrl-C, most likely in the middle of writing a file
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not _partials(out), "temporary files left behind"
    assert not list(out.glob(".*.claim")) and not list(out.glob(".*.lock")), "claims or the summary lock left behind"
    finished = [p for p in inputs if (out / f"{p.stem}.json").exists()]
    assert inputs[0] in finished and inputs[-1] not in finished
    cfg = RunConfig(model_path=str(tiny_model))
    for path in finished:
        assert is_complete(out, path.stem, path, cfg, file_sha256(tiny_model))
    # An unfinished input may have some of its files, but none of them cut short.
    for path in set(inputs) - set(finished):
        for result in out.glob(f"{path.stem}*"):
            _assert_readable(result)


def _assert_readable(path: Path) -> None:
    from PIL import Image

    if path.suffix == ".csv":
        rows = path.read_text().splitlines()
        assert rows[0] == "x,y,x_um,y_um,confidence,area_um2" and all(row.count(",") == 5 for row in rows), path
    elif path.suffix == ".geojson":
        assert json.loads(path.read_text())["type"] == "FeatureCollection"
    elif path.suffix == ".tiff":
        assert tifffile.imread(path).ndim == 2
    else:
        assert path.suffix == ".png"
        Image.open(path).verify()


# ------------------------------------------------------------------------------------- a corrupt tile


def _he_pyramid(path: Path, shared_data: Path, levels: int) -> Path:
    """A tiled JPEG TIFF of real H&E (four 500-px CRC images, 0.55 µm/px) with `levels` levels of 128-px tiles."""
    from PIL import Image

    images = [np.asarray(Image.open(shared_data / "crc-dev" / "images" / f"img{i}.png").convert("RGB")) for i in (1, 2, 3, 4)]
    he = np.vstack([np.hstack(images[:2]), np.hstack(images[2:])])  # 1000 × 1000
    per_cm = 1e4 / 0.55
    with tifffile.TiffWriter(path) as tiff:
        for level in range(levels):
            ds = 2**level
            image = np.asarray(Image.fromarray(he).resize((1000 // ds, 1000 // ds), Image.Resampling.BOX))
            tiff.write(image, tile=(128, 128), compression="jpeg", photometric="rgb", subfiletype=int(level > 0),
                       resolution=(per_cm / ds, per_cm / ds), resolutionunit="CENTIMETER")
    return path


def _corrupt_tile(path: Path, tile_row: int, tile_col: int) -> None:
    """Overwrite one level-0 tile's JPEG data with random bytes: the file opens, that tile cannot be decoded."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = tile_row * -(-page.imagewidth // page.tilewidth) + tile_col
        offset, size = page.dataoffsets[index], page.databytecounts[index]
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture()
def slide_with_a_corrupt_tile(tmp_path: Path, shared_data: Path) -> Path:
    """Two levels; level-0 tile (4, 4) holds garbage. The open-time probe (level 1) and the tissue mask
    (read from level 1) are intact, so only the detection tiles covering that area meet the damage."""
    (tmp_path / "in").mkdir()
    path = _he_pyramid(tmp_path / "in" / "he.tif", shared_data, levels=2)
    _corrupt_tile(path, 4, 4)
    return path


def test_a_corrupt_tile_is_skipped_and_reported_and_the_rest_of_the_slide_is_detected(tmp_path: Path, slide_with_a_corrupt_tile: Path, tiny_model: Path) -> None:
    from click.testing import CliRunner

    from wsiproc.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(slide_with_a_corrupt_tile), "--out", str(out), "--model", str(tiny_model), "--tile-px", "256", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{slide_with_a_corrupt_tile}: warning: 1 tile(s) could not be decoded and were skipped" in result.output
    record = json.loads((out / "he.json").read_text())
    # Level-0 pixels 512–640 are 563–704 at 0.5 µm/px: inside tile (row 2, col 2) of 256 px, halo included.
    [failed] = record["stats"]["failed_tiles"]
    assert (failed["row"], failed["col"]) == (2, 2) and failed["error"]
    assert any("could not be decoded" in w for w in record["warnings"])
    assert sorted(record["outputs"].values()) == sorted(f"he{s}" for s in OUTPUT_SUFFIXES)  # the QC picture too
    assert record["tiles"]["tiles_computed"] == 25 and record["nuclei"] > 100  # the other 24 tiles were detected
    xy = np.loadtxt(out / "he.csv", delimiter=",", skiprows=1, usecols=(0, 1))
    lo, hi = np.array([512, 768]) * 0.5 / 0.55  # the skipped tile's core in level-0 pixels
    assert not ((xy > lo + 2) & (xy < hi - 2)).all(axis=1).any(), "nuclei reported inside the skipped tile"


def test_strict_fails_the_slide_on_a_corrupt_tile(tmp_path: Path, slide_with_a_corrupt_tile: Path, tiny_model: Path) -> None:
    from click.testing import CliRunner

    from wsiproc.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(slide_with_a_corrupt_tile), "--out", str(out), "--model", str(tiny_model), "--tile-px", "256", "--quiet", "--strict"])
    assert result.exit_code == 1
    [line] = [line for line in result.output.splitlines() if line.startswith(f"{slide_with_a_corrupt_tile}: ")]
    assert "tile (row 2, col 2) cannot be decoded" in line
    assert "done 0, skipped 0, failed 1 of 1 inputs" in result.output
    assert sorted(p.name for p in out.iterdir()) == [".he.outcome.json", "summary.csv"]  # no result file, the reason noted


def test_a_corrupt_tile_in_a_single_level_file_is_skipped_too(tmp_path: Path, shared_data: Path, tiny_predictor) -> None:
    """Without a pyramid the tissue mask is read from level 0 as well, and meets the damage there."""
    from wsiproc.cohort.batch import run_batch
    from wsiproc.config import RunConfig

    path = _he_pyramid(tmp_path / "flat.tif", shared_data, levels=1)
    _corrupt_tile(path, 4, 4)
    lines: list[str] = []
    [outcome] = run_batch([path], tmp_path / "out", RunConfig(tile_px=256), tiny_predictor, echo=lines.append)
    assert outcome.status == "done", outcome.detail
    assert any(w.startswith("no tissue mask (the overview cannot be decoded") for w in outcome.warnings), outcome.warnings
    record = json.loads((tmp_path / "out" / "flat.json").read_text())
    assert [(f["row"], f["col"]) for f in record["stats"]["failed_tiles"]] == [(2, 2)]
    assert record["tiles"]["tiles_computed"] == 25 and record["nuclei"] > 100


# ------------------------------------------------------------------------------------- not what the model expects


def test_a_fluorescence_slide_is_flagged_as_not_brightfield(slides: Path) -> None:
    from wsiproc.config import RunConfig
    from wsiproc.detection.loop import plan_tiles
    from wsiproc.io.slide import open_slide
    from wsiproc.detection.tiling import SlideSampler

    slide = open_slide(slides / "test3-DAPI-2-(387).ndpi")
    _, _, info, _ = plan_tiles(SlideSampler.for_slide(slide, 0.5), RunConfig(tile_px=256))
    [warning] = [w for w in info["warnings"] if "does not look like brightfield H&E" in w]
    assert "fluorescence" in warning
    assert info["median_brightness"] < 100
    he = open_slide(slides / "monusac" / "A9K0_1.svs")
    _, _, he_info, _ = plan_tiles(SlideSampler.for_slide(he, 0.5), RunConfig(tile_px=256))
    assert not any("brightfield" in w for w in he_info["warnings"])


def test_a_print_resolution_is_not_taken_for_a_pixel_size(tmp_path: Path, slides: Path, tiny_model: Path) -> None:
    """boxes.tiff stores 72 dpi (352.8 µm/px), as image tools do by default; taken at its word, a 300-px image
    would become 200,000 px at 0.5 µm/px and the run would not end. It must ask for --mpp instead."""
    from click.testing import CliRunner

    from wsiproc.cli import main
    from wsiproc.io.slide import open_slide

    boxes = slides / "openslide-fixtures" / "boxes.tiff"
    slide = open_slide(boxes)
    assert slide.mpp is None and "352.8 µm/px" in slide.mpp_source
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(boxes), "--out", str(out), "--model", str(tiny_model), "--quiet"])
    assert result.exit_code == 1
    assert f"{boxes}: no usable pixel size stored in the file (ignored: 352.8 µm/px stored" in result.output
    assert "give it with --mpp" in result.output
    given = CliRunner().invoke(main, ["run", str(boxes), "--mpp", "0.5", "--out", str(out), "--model", str(tiny_model), "--quiet"])
    assert given.exit_code == 0, given.output
    assert json.loads((out / "boxes.json").read_text())["mpp_used"] == 0.5


if __name__ == "__main__" and sys.argv[1:2] == ["fuzz-child"]:
    _child_main(*sys.argv[2:])
