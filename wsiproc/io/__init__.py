"""Reading slides and images (`slide`), moving between pixel grids (`resample`), writing files atomically (`files`)."""
