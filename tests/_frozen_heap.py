"""Imported last by the forked ranks' server (tests/forkranks.py): its objects move to the
garbage collector's permanent generation, so a forked rank's collections do not write to the
server's pages (each write a copy-on-write page fault)."""

import gc

gc.collect()
gc.freeze()
