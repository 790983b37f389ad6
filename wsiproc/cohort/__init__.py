"""Many slides: one slide end to end (`one_slide`), the batch with resume and claims (`batch`, `claims`), the cohort
table summary.csv (`summary`) and the dask cluster (`cluster`)."""
