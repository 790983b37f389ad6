"""Checking models: scoring against annotations (`scoring`; the readers are `wsiproc.io.annotations`), LRP heat maps
(`explain`)."""
