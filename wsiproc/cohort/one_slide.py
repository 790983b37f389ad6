"""One input, end to end: open the slide, detect its nuclei (`wsiproc.detection.loop`), write its result files
and run record (`wsiproc.outputs`)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path


from ..config import RunConfig
from ..detection.inference import Predictor
from ..detection.loop import ProgressFn, detect
from ..io.slide import open_slide
from ..outputs.qc import QcSlide
from ..outputs.record import RunRecord
from ..outputs.formats import write_outputs


def run_slide(path: str | Path, out_dir: str | Path, cfg: RunConfig, predictor: Predictor, stem: str | None = None,
              progress: ProgressFn | None = None, extra_input: dict | None = None, client=None) -> dict:
    """Process one input and write its outputs; returns the run record (also written as `<stem>.json`)."""
    t0 = time.perf_counter()
    path = Path(path)
    slide = open_slide(path, cfg.mpp)
    try:
        level0_mpp = slide.require_mpp()
        result = detect(slide, cfg, predictor, progress, client=client)
        record = RunRecord.of(slide, predictor, cfg.to_dict(), result, extra_input)
        w0, h0 = slide.dimensions
        # Everything but writing the files themselves: the record is written last and cannot time itself.
        record.timings_s["total_before_write_s"] = round(time.perf_counter() - t0, 3)
        # GeoJSON ids seeded by what determines the result: a rerun writes byte-identical files. Without classes
        # in the result, `classes` is left out, so the ids are those of the versions before nucleus types.
        seeded = cfg.to_dict()
        if result.detections.class_probs is None:
            seeded.pop("classes", None)
        id_seed = int(hashlib.sha256(json.dumps([predictor.sha256, record.input, seeded], sort_keys=True, default=str).encode()).hexdigest()[:16], 16)

        outputs = write_outputs(Path(out_dir), stem or path.stem, result.detections, level0_mpp, (h0, w0), record.to_dict(),
                                cell_um=cfg.density_cell_um, geojson_gz=cfg.geojson_gz, id_seed=id_seed, qc=QcSlide(result.sampler, result.tissue))
        record.outputs = {key: p.name for key, p in outputs.items()}
        return record.to_dict()
    finally:
        slide.close()


