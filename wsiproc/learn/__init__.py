"""Making models: training on annotated images (`trainer`, `training`, `train_domains`, `annotated`, `check`,
`datasets`), adaptation to a new cohort without annotations (`adapt`) and int8 quantisation (`quantize`)."""
