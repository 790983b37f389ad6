"""Which engine runs the network, at which precision, and the OpenVINO engine itself with its on-disk cache.

Why OpenVINO on a CPU: TensorFlow's CPU kernels run this network in float32 only, while OpenVINO runs the same
graph in bfloat16 (AVX-512 BF16, AMX) or int8 (VNNI, AMX) with oneDNN kernels chosen for the CPU it finds. On a
GPU, TensorFlow stays (mixed float16 on tensor cores). `resolve()` holds the whole rule, so that the Predictor
and `wsiproc engines` (what a user's machine will use) can never disagree:

- engine ``auto``: OpenVINO, unless TensorFlow sees a GPU or the precision asked for is TensorFlow's own
  (``mixed_float16``); then TensorFlow.
- precision ``auto`` on OpenVINO: ``int8`` when an int8 model of exactly this ``.keras`` file lies beside it
  (``<stem>.int8.xml``, made by `wsiproc quantize`) and its record shows an F1 loss within the record's own
  tolerance on every domain it was validated on (`model_files.int8_accepted`); otherwise ``bfloat16`` where OpenVINO reports BF16 for the CPU; otherwise ``float32``.

The `.keras` model is converted once (`convert_keras`: the sub-pixel head rewrite applied, uint8 input with
the /255 folded in, dynamic batch and size) and kept as OpenVINO IR in the cache, keyed by the model file's
sha256, beside the compiled blob of each (IR, precision, threads, CPU) combination. Every cache file is
written under a temporary name and renamed, and carries the sha256 of its content: several processes (dask
workers, SLURM tasks on a shared home) can fill and read it at once, and a stale or corrupt entry is
rebuilt, never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ModelError, problem
from ..io.files import atomic_path
from .architectures import geometry as network_geometry, has_class_head
from .classes import CLASSES
from .forward import keras_forward
from .model import load_model
from .model_files import ModelFiles, check_ir, int8_accepted, ir_sha256, read_record, stored_precision

ENGINES = ("auto", "openvino", "tensorflow")
PRECISIONS = ("auto", "float32", "bfloat16", "int8", "mixed_float16")
#: Precisions each engine can run (TensorFlow's bfloat16/int8 CPU kernels are no faster than its float32).
ENGINE_PRECISIONS = {"openvino": ("float32", "bfloat16", "int8"), "tensorflow": ("float32", "mixed_float16")}
#: Bumped whenever `convert_keras` changes what it produces: part of the cache key, so old IR is not reused.
CONVERTER_REVISION = 3
#: /proc/cpuinfo flags that decide which OpenVINO kernels run (recorded in every run record).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
OV_HINTS = {"float32": "f32", "bfloat16": "bf16"}


# ---------------------------------------------------------------------------------------------------- machine


@dataclass(frozen=True)
class CpuInfo:
    """What OpenVINO and the kernel say about this CPU."""

    name: str
    openvino_capabilities: tuple[str, ...]  # OPTIMIZATION_CAPABILITIES: FP32, BF16, INT8, …
    flags: tuple[str, ...]  # the CPU_FLAGS this CPU has

    @property
    def bf16(self) -> bool:
        return "BF16" in self.openvino_capabilities

    @property
    def int8(self) -> bool:
        return "INT8" in self.openvino_capabilities


def openvino_version() -> str | None:
    """OpenVINO's version, or None where it cannot be imported (a platform without wheels)."""
    try:
        import openvino  # lazy: the engine's runtime, loaded when a model is; `wsiproc info` and the outputs never need it
    except ImportError:
        return None
    return openvino.get_version()


def _cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return tuple(f for f in CPU_FLAGS if f in present)
    except OSError:
        pass
    return ()


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The CPU as OpenVINO sees it (asked once per process)."""
    name, caps = "unknown CPU", ()
    if openvino_version() is not None:
        import openvino as ov  # lazy: the engine's runtime, loaded when a model is; `wsiproc info` and the outputs never need it

        core = ov.Core()
        name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
        caps = tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return CpuInfo(name, caps, _cpu_flags())


#: Device files a GPU driver creates (NVIDIA's, AMD's ROCm): without any of them TensorFlow cannot see a GPU.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


@lru_cache(maxsize=1)
def tensorflow_gpus() -> int:
    """GPUs TensorFlow sees. Where no GPU driver is present TensorFlow is not even imported: the OpenVINO engine
    never needs it, and importing it is most of a start-up's seconds."""
    if "tensorflow" not in sys.modules and not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        return 0
    import tensorflow as tf  # lazy: seconds to import; only the TensorFlow engine, conversion and training need it

    return len(tf.config.list_physical_devices("GPU"))


def default_threads() -> int:
    """Threads the engine may use: what a dask worker was given, else the CPUs this process may run on.

    A dask worker reads its tiles in the task's own thread, so giving the engine the worker's thread count
    keeps `--workers N` processes from oversubscribing the machine. `WSIPROC_THREADS` overrides both.
    """
    env = os.environ.get("WSIPROC_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"WSIPROC_THREADS must be a whole number (got {env!r})") from None
    if "distributed" in sys.modules:  # only a dask worker process has imported it before the model is loaded
        try:
            from distributed import get_worker  # lazy: dask's cluster, loaded only when a run asks for workers

            return max(1, int(get_worker().state.nthreads))
        except (ValueError, AttributeError):
            pass
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects taskset / SLURM --cpus-per-task
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------- choice


@dataclass
class Choice:
    """The engine and precision a model will run with, and why (what `wsiproc engines` prints)."""

    engine: str
    precision: str
    device: str  # "CPU" or "GPU"
    reason: str
    ir_path: Path | None = None  # a stored IR that runs as is: the int8 model, or an IR given as the model


def int8_path_for(model_path: str | Path) -> Path:
    """Where `wsiproc quantize` puts, and the Predictor looks for, the int8 model of `model_path`."""
    return ModelFiles.of(model_path).int8


def _validated_int8(model_path: Path) -> tuple[Path | None, str]:
    """The int8 IR beside `model_path` if it is fresh and passed its F1 check, else (None, why not)."""
    path = int8_path_for(model_path)
    if not path.is_file():
        return None, f"no int8 model {path.name} beside the model"
    try:
        record = check_ir(path, source=model_path)
    except ValueError as exc:
        return None, str(exc)
    ok, why = int8_accepted(record)
    return (path, why) if ok else (None, f"{path.name}: {why}")


def resolve(model_path: str | Path, engine: str = "auto", precision: str = "auto") -> Choice:
    """The engine and precision `Predictor(model_path, precision, engine)` will use; one-line ValueError if impossible."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)} (got {engine!r})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    model_path = Path(model_path)
    if model_path.suffix.lower() == ".xml":  # an OpenVINO IR given as the model: it runs at the precision stored
        if engine == "tensorflow":
            raise ModelError(f"{model_path}: an OpenVINO IR runs only with --engine openvino (or auto)")
        check_ir(model_path)  # a stale or replaced file is refused, naming it
        stored = stored_precision(model_path)
        if stored == "int8":
            if precision not in ("auto", "int8"):
                raise ModelError(f"{model_path}: an int8 model cannot run in {precision}; give the .keras it was made from")
            return Choice("openvino", "int8", "CPU", "an int8 OpenVINO model given as the model", model_path)
        if precision not in ("auto", "float32", "bfloat16"):
            raise ModelError(f"{model_path}: a float OpenVINO model runs in float32 or bfloat16, not {precision}")
        if precision == "auto":
            precision = "bfloat16" if cpu_info().bf16 else "float32"
        return Choice("openvino", precision, "CPU", "an OpenVINO model given as the model", model_path)
    if model_path.suffix.lower() == ".tflite":
        raise ModelError(f"{model_path}: TFLite models are no longer run; make an OpenVINO int8 model with "
                         "`wsiproc quantize` from the .keras it came from")
    have_openvino = openvino_version() is not None
    if engine == "auto":
        if precision == "mixed_float16":
            engine, why = "tensorflow", "mixed_float16 is TensorFlow's precision"
        elif precision == "auto" and tensorflow_gpus():
            engine, why = "tensorflow", "TensorFlow sees a GPU"
        elif not have_openvino:
            if precision in ("bfloat16", "int8"):
                raise ValueError(f"precision {precision} needs OpenVINO, which cannot be imported here (pip install openvino)")
            engine, why = "tensorflow", "OpenVINO cannot be imported on this platform"
        else:
            engine, why = "openvino", "CPU: OpenVINO is the fastest CPU engine"
    else:
        why = f"engine {engine} asked for"
        if engine == "openvino" and not have_openvino:
            raise ValueError("engine openvino: OpenVINO cannot be imported here (pip install openvino)")
    if engine == "tensorflow":
        device = "GPU" if tensorflow_gpus() else "CPU"
        if precision == "auto":
            precision = "mixed_float16" if device == "GPU" else "float32"
        elif precision not in ENGINE_PRECISIONS["tensorflow"]:
            raise ValueError(f"precision {precision} runs only on OpenVINO (--engine openvino or auto), not TensorFlow")
        return Choice("tensorflow", precision, device, why)
    if precision not in ("auto", *ENGINE_PRECISIONS["openvino"]):
        raise ValueError(f"precision {precision} runs only on TensorFlow (--engine tensorflow or auto)")
    cpu = cpu_info()
    if precision == "int8":
        path = int8_path_for(model_path)
        if not path.is_file():
            raise ModelError(f"{model_path}: no int8 model beside it ({path.name}); make one with "
                             f"`wsiproc quantize {model_path} --domains DATA --out {path}`")
        check_ir(path, source=model_path)  # a stale int8 file is refused, naming it
        return Choice("openvino", "int8", "CPU", f"{why}; int8 asked for", path)
    if precision == "bfloat16" and not cpu.bf16:
        raise ValueError(f"precision bfloat16: this CPU has no bfloat16 arithmetic (OpenVINO reports "
                         f"{', '.join(cpu.openvino_capabilities) or 'nothing'}); use float32 or int8")
    if precision != "auto":
        return Choice("openvino", precision, "CPU", f"{why}; {precision} asked for")
    int8, int8_why = _validated_int8(model_path) if cpu.int8 else (None, "the CPU has no int8 support")
    if int8 is not None:
        return Choice("openvino", "int8", "CPU", f"{why}; int8: {int8_why}", int8)
    if cpu.bf16:
        return Choice("openvino", "bfloat16", "CPU", f"{why}; bfloat16 (the CPU has it; not int8: {int8_why})")
    return Choice("openvino", "float32", "CPU", f"{why}; float32 (no bfloat16 on this CPU; not int8: {int8_why})")


# ---------------------------------------------------------------------------------------------------- conversion


def model_geometry(keras_model) -> dict:
    """What the tiler needs from a network (`architectures.geometry`), as stored beside converted models."""
    g = network_geometry(keras_model)
    out = {"architecture": keras_model.name, "size_multiple_px": g.size_multiple_px,
           "receptive_radius_px": g.receptive_radius_px, "halo_px": g.halo_px}
    if has_class_head(keras_model):  # only then: class-less models keep the records (and IR cache keys) they had
        out.update(classes=list(CLASSES), class_receptive_radius_px=g.class_receptive_radius_px)
    return out


def convert_keras(model_path: str | Path):
    """The `.keras` model as an OpenVINO model: (B, H, W, 3) uint8 in, (B, H, W) float32 confidence out.

    Returns (OpenVINO model, `model_geometry` of the network), so the geometry is known without Keras later.

    It converts the traced function the TensorFlow engine runs (`forward.keras_forward`: the sub-pixel head
    rewrite where `model.subpixel_head` applies), with nearest upsamplings as concat + depth-to-space (same
    output, native OpenVINO ops); uint8 input keeps the /255 inside the graph and the tiles' bytes a quarter
    of float32's.
    """
    import openvino as ov  # lazy: only converting needs the converter
    import tensorflow as tf  # lazy: seconds to import; only converting a .keras needs it

    keras_model = load_model(model_path)
    forward = keras_forward(keras_model, mixed_float16=False, for_openvino=True)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="rgb")])
    def graph(rgb):
        return forward(rgb)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras' input-structure notice on every trace
        try:
            model = ov.convert_model(graph)
        except Exception as exc:  # the converter raises many types
            raise ModelError(f"{model_path}: cannot be converted to OpenVINO ({problem(exc)})") from exc
    model.inputs[0].get_tensor().set_names({"rgb"})
    model.outputs[0].get_tensor().set_names({"confidence"})
    return model, model_geometry(keras_model)


# ---------------------------------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $WSIPROC_CACHE, else $XDG_CACHE_HOME/wsiproc, else ~/.cache/wsiproc."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("WSIPROC_CACHE"):
        return Path(os.environ["WSIPROC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wsiproc"


def _sha256_bytes(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


BLOB_MAGIC = b"WSIPROC-OPENVINO-BLOB-1\n"


class ModelCache:
    """Converted IR and compiled blobs under one folder, safe to share between processes.

    Layout: ``ir/<model sha256>-r<converter revision>-ov<version>/{model.xml, model.bin, manifest.json}``
    (the folder is written under a temporary name and renamed whole; the manifest holds the sha256 of the
    pair and is checked on every load) and ``compiled/<key>.blob`` (one file: a header with the sha256 of
    the payload, then OpenVINO's export; the key hashes the IR digest, device, properties, OpenVINO version
    and CPU). A folder that refuses writes degrades to no caching, with one warning.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = cache_root(root)
        self.status: dict[str, str] = {}  # what happened: {"ir": "hit"|"built"|"rebuilt"|"memory", "compiled": …}

    # -- helpers
    def _writable(self, folder: Path) -> bool:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe.{secrets.token_hex(4)}.partial"
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError as exc:
            warnings.warn(f"{folder}: cache folder not writable ({exc.strerror or exc}); converting in memory each run",
                          stacklevel=3)
            return False

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """An advisory lock so that N processes starting together convert once, not N times.

        Only for efficiency: correctness comes from the atomic renames, so where locks do not work
        (some network file systems) it is skipped, and a holder is waited for at most 10 minutes.
        """
        try:
            import fcntl  # lazy: POSIX only
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        lock_dir = self.root / "locks"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fh = open(lock_dir / f"{name}.lock", "a+b")
        except OSError:
            yield
            return
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                except OSError:
                    break
            yield
        finally:
            fh.close()  # releases the lock

    # -- converted IR
    def ir_dir(self, model_sha256: str) -> Path:
        return self.root / "ir" / f"{model_sha256}-r{CONVERTER_REVISION}-ov{_short_version()}"

    def _check_ir(self, folder: Path) -> tuple[str, dict] | None:
        """(IR digest, manifest) if the folder holds a complete, uncorrupted entry; None if absent; raises if corrupt."""
        manifest = folder / "manifest.json"
        if not folder.is_dir():
            return None
        try:
            record = json.loads(manifest.read_text(encoding="utf-8"))
            digest = ir_sha256(folder / "model.xml")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: incomplete cache entry ({exc.__class__.__name__})") from exc
        if not isinstance(record, dict) or record.get("ir_sha256") != digest:
            raise ValueError(f"{folder}: cache entry does not match its manifest")
        return digest, record

    def _sound(self, folder: Path) -> tuple[str, dict] | None:
        """(IR digest, manifest); None when absent, or when corrupt (then it is moved aside to be rebuilt)."""
        try:
            return self._check_ir(folder)
        except ValueError as exc:
            warnings.warn(f"{exc}; rebuilt", stacklevel=4)
            self._discard(folder)
            self.status["ir"] = "rebuilt"
            return None

    def ir(self, model_path: Path, model_sha256: str, build: Callable[[], tuple]) -> tuple[Path | object, str, dict]:
        """(xml path of the converted model, its IR digest, its geometry), converting with `build()` on a miss.

        `build()` returns (OpenVINO model, geometry dict). Without a writable cache: (the in-memory model, "",
        geometry) and status "memory".
        """
        folder = self.ir_dir(model_sha256)
        entry = self._sound(folder)
        if entry is None:
            if not self._writable(folder.parent):
                self.status["ir"] = "memory"
                model, meta = build()
                return model, "", meta
            with self._lock(folder.name):
                entry = self._sound(folder)  # another process may have written it while this one waited
                if entry is None:
                    self._write_ir(folder, *build(), model_path, model_sha256)
                    self.status.setdefault("ir", "built")
                    entry = self._check_ir(folder)  # just written (by this or a racing process): must be sound
                    if entry is None:
                        raise ValueError(f"{folder}: cache entry vanished while being written")
        self.status.setdefault("ir", "hit")
        digest, record = entry
        return folder / "model.xml", digest, dict(record.get("geometry") or {})

    def _write_ir(self, folder: Path, model, geometry: dict, model_path: Path, model_sha256: str) -> None:
        import openvino as ov  # lazy: the engine's runtime, loaded when a model is; `wsiproc info` and the outputs never need it

        tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(6)}.partial")
        try:
            tmp.mkdir(parents=True)
            ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)  # float32 weights: f16 would move results
            record = {"source_model": str(model_path), "source_sha256": model_sha256, "ir_sha256": ir_sha256(tmp / "model.xml"),
                      "converter_revision": CONVERTER_REVISION, "openvino_version": openvino_version(), "geometry": geometry}
            (tmp / "manifest.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            for child in tmp.iterdir():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(tmp, folder)  # atomic; fails if another process got there first
            except OSError:
                if not folder.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _discard(self, path: Path) -> None:
        """Move a bad entry aside (atomic) before deleting it, so no reader ever sees it half-deleted."""
        aside = path.with_name(f".{path.name}.{secrets.token_hex(6)}.stale.partial")
        try:
            os.rename(path, aside)
        except OSError:
            return
        if aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)

    # -- compiled blobs
    def blob_path(self, ir_digest: str, device: str, config: dict) -> Path:
        cpu = cpu_info()
        key = json.dumps({"ir": ir_digest, "device": device, "config": {k: str(v) for k, v in sorted(config.items())},
                          "openvino": openvino_version(), "cpu": [cpu.name, cpu.openvino_capabilities, cpu.flags],
                          # oneDNN's instruction cap changes the kernels compiled in, as a different CPU would
                          "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", "")},
                         sort_keys=True)
        return self.root / "compiled" / f"{_sha256_bytes(key.encode())[:40]}.blob"

    def compiled(self, core, model, ir_digest: str, device: str, config: dict):
        """`core.compile_model(model, device, config)`, imported from the blob cache when a sound blob is there."""
        if not ir_digest:  # nothing to key on (in-memory model)
            self.status["compiled"] = "memory"
            return core.compile_model(model, device, config)
        path = self.blob_path(ir_digest, device, config)
        if path.is_file():
            try:
                data = path.read_bytes()
                head, digest, payload = data[: len(BLOB_MAGIC)], data[len(BLOB_MAGIC) : len(BLOB_MAGIC) + 64], data[len(BLOB_MAGIC) + 64 :]
                if head != BLOB_MAGIC or digest.decode("ascii", "replace") != _sha256_bytes(payload):
                    raise ValueError("checksum mismatch")
                compiled = core.import_model(payload, device, config)
                self.status["compiled"] = "hit"
                return compiled
            except Exception as exc:  # a corrupt or foreign blob: rebuild it, never trust it
                warnings.warn(f"{path}: corrupt compiled-model cache ({problem_of(exc)}); rebuilt", stacklevel=3)
                self._discard(path)
                self.status["compiled"] = "rebuilt"
        compiled = core.compile_model(model, device, config)
        self.status.setdefault("compiled", "built")
        if self._writable(path.parent):
            try:
                payload = compiled.export_model()
                payload = payload.getvalue() if hasattr(payload, "getvalue") else bytes(payload)  # BytesIO in 2026.x
                with atomic_path(path) as tmp:
                    tmp.write_bytes(BLOB_MAGIC + _sha256_bytes(payload).encode("ascii") + payload)
            except Exception as exc:  # exporting is an optimisation: never fail a run over it
                warnings.warn(f"{path}: compiled model not cached ({problem_of(exc)})", stacklevel=3)
        return compiled


def problem_of(exc: BaseException) -> str:
    return problem(exc)


def _short_version() -> str:
    version = openvino_version() or "none"
    return version.split("-")[0]


# ---------------------------------------------------------------------------------------------------- engine


@dataclass
class OpenVINOSettings:
    """Properties the CPU plugin compiles with.

    One stream with the LATENCY hint: a batch is one request spread over all `threads`, which is what a
    pipeline that waits for each batch needs (THROUGHPUT would split the cores into streams that only pay
    with many requests in flight). `threads` defaults to `default_threads()`: every core, although the reader
    and post-processing threads need CPU too, because the engine finishes sooner than it waits. Threads are not
    pinned, so a reader that wakes up is not starved on a core an engine thread holds. Measured with the
    pipeline on the sample slide (2 cores, 2 reader threads, U-Net, bfloat16): 3.46 MP/s with 2 unpinned
    engine threads, 3.30 pinned, 2.93 with one thread.
    """

    precision: str = "float32"  # float32 | bfloat16 | int8 (the int8 IR; its non-quantized ops run as hinted)
    threads: int = field(default_factory=default_threads)
    pinning: bool = False

    def properties(self) -> dict:
        # An int8 model's unquantised remainder (depthwise convolutions, concatenations, the sigmoid) runs in
        # bfloat16 where the CPU has it: in float32 it made vgg-lean's int8 slower than its bfloat16.
        hint = OV_HINTS.get(self.precision) or ("bf16" if self.precision == "int8" and cpu_info().bf16 else "f32")
        return {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": int(self.threads),
                "INFERENCE_PRECISION_HINT": hint, "ENABLE_CPU_PINNING": bool(self.pinning)}


class OpenVINOForward:
    """A compiled OpenVINO model as a (B, H, W, 3) uint8 → (B, H, W) float32 function.

    One infer request, locked: dask worker threads may share a Predictor, and one request must not run two
    batches at once. The input shape is dynamic; OpenVINO keeps the kernels of each shape it has seen, and a
    run's tiles share one shape.
    """

    def __init__(self, compiled):
        self.compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8:  # values 0–255 in another type: what TensorFlow's cast would have made of them
            tiles = np.clip(np.rint(tiles), 0, 255).astype(np.uint8)
        x = np.ascontiguousarray(tiles)
        with self._lock:
            self._request.infer({0: x}, share_inputs=True)
            out = np.array(self._request.get_output_tensor(0).data, dtype=np.float32)  # copy: the request is reused
        return out


def load_openvino(model_path: Path, model_sha256: str, choice: Choice, threads: int | None = None,
                  cache_dir: str | Path | None = None) -> tuple[OpenVINOForward, dict]:
    """Convert (or take from the cache), compile (or import) and wrap; returns (forward, what happened)."""
    import openvino as ov  # lazy: the engine's runtime, loaded when a model is; `wsiproc info` and the outputs never need it

    t0 = time.perf_counter()
    cache = ModelCache(cache_dir)
    settings = OpenVINOSettings(choice.precision, threads or default_threads())
    core = ov.Core()
    if choice.ir_path is not None:  # a stored IR (int8, or an IR given as the model): read as is
        digest = ir_sha256(choice.ir_path)
        try:
            model = core.read_model(choice.ir_path)
        except Exception as exc:
            raise ModelError(f"{choice.ir_path}: not a loadable OpenVINO model ({problem_of(exc)})") from None
        cache.status["ir"] = "file"
        geometry = dict((read_record(choice.ir_path) or {}).get("geometry") or {})
    else:
        model, digest, geometry = cache.ir(model_path, model_sha256, lambda: convert_keras(model_path))
        if isinstance(model, Path):
            try:
                model = core.read_model(model)
            except Exception as exc:  # checked against its manifest, so this is a broken OpenVINO, not the cache
                raise ValueError(f"{model}: cached model cannot be read ({problem_of(exc)})") from None
    _check_io(model, choice.ir_path or model_path)
    if model.outputs[0].get_partial_shape().rank.get_length() == 4 and not geometry.get("classes"):
        # an IR from elsewhere with a class output: the channels after confidence
        geometry = {**geometry, "classes": list(CLASSES)}
    compiled = cache.compiled(core, model, digest, "CPU", settings.properties())
    info = {"geometry": geometry, "threads": settings.threads, "cache": str(cache.root), "cache_status": dict(cache.status),
            "load_s": round(time.perf_counter() - t0, 3), "properties": {k: str(v) for k, v in settings.properties().items()}}
    return OpenVINOForward(compiled), info


def _check_io(model, path: Path) -> None:
    """One (B, H, W, 3) input and one output: what every wsiproc model has; anything else is named and refused."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"{path}: expected one input and one output, got {len(model.inputs)} and {len(model.outputs)}")
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4 or str(shape[3]) != "3":
        raise ModelError(f"{path}: expected a (batch, height, width, 3) input, got {shape}")


def describe_machine() -> dict:
    """The machine facts a run record needs: CPU, its flags that matter, OpenVINO's view of it, versions."""
    cpu = cpu_info()
    out = {"cpu": cpu.name, "cpu_flags": list(cpu.flags), "openvino_capabilities": list(cpu.openvino_capabilities),
           "openvino_version": openvino_version(), "cpus_available": default_threads()}
    return out


def report(model_path: str | Path, engine: str = "auto", precision: str = "auto") -> dict:
    """What `wsiproc engines` prints: the machine, the choice for `model_path`, and every precision on offer."""
    model_path = Path(model_path)
    out: dict = {"model": str(model_path), **describe_machine(), "tensorflow_gpus": tensorflow_gpus(),
                 "cache": str(cache_root())}
    try:
        choice = resolve(model_path, engine, precision)
        out["choice"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(choice).items()}
    except ValueError as exc:
        out["choice"] = {"error": problem_of(exc)}
    offered = {}
    for eng, precs in ENGINE_PRECISIONS.items():
        for prec in precs:
            try:
                c = resolve(model_path, eng, prec)
                offered[f"{eng} {prec}"] = f"available ({c.device})"
            except ValueError as exc:
                offered[f"{eng} {prec}"] = f"not available: {problem_of(exc)}"
    out["available"] = offered
    return out
