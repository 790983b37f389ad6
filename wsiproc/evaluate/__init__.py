"""Checking models: annotations in any format (`annotations`), scoring against them (`scoring`), LRP heat maps
(`explain`)."""
