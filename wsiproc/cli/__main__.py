"""`python -m wsiproc.cli`: the `wsiproc` command."""
from . import main

main()
