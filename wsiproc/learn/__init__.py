"""Making models: training on annotated images (`training`, `datasets`), adaptation to a new cohort without
annotations (`adapt`) and int8 quantisation (`quantize`)."""
