"""What a run leaves per slide: CSV, QuPath GeoJSON and density maps (`formats`), the QC picture (`qc`) and the run
record (`record`)."""
