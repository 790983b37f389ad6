"""Reading slides and images (`slide`), annotations of any format as points and regions (`annotations`), moving
between pixel grids (`resample`), writing files atomically (`files`)."""
