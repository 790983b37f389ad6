"""The `wsiproc` command line: one module per command, each parsing its options and calling the library.

Importing this package (what `wsiproc --help` does) loads click and the commands' option tables only: every
command imports what it needs when it runs, so neither TensorFlow nor OpenVINO nor dask is loaded for help or
`wsiproc info`. Errors reach the user as one line and an exit code decided in `common.EXIT_CODES`.
"""
from __future__ import annotations

import os

import click

from .. import _tensorflow
from .._version import __version__
from .adapt import adapt
from .common import Group
from .engines import engines
from .evaluate import evaluate
from .explain import explain
from .info import info
from .quantize import quantize
from .run import SAMPLE_SLIDE, run
from .train import train

__all__ = ["main", "SAMPLE_SLIDE"]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiproc")
@click.option("--verbose", "-v", is_flag=True, help="Also show the engines' own log lines (TensorFlow, oneDNN, absl).")
def main(verbose: bool) -> None:
    """Find every cell nucleus in H&E whole-slide images."""
    _tensorflow.install()  # TensorFlow, whenever a command loads it, starts without printing to the terminal
    if verbose:
        os.environ["WSIPROC_VERBOSE"] = "1"  # read where TensorFlow is imported (worker processes inherit it)


for _command in (adapt, engines, evaluate, explain, info, quantize, run, train):
    main.add_command(_command)
