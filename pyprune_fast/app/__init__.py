"""The `pyprune-fast` application, apart from the library: the command line (`cli`), the experiment
runner behind `pyprune-fast prune` (`runner`: score once per criterion, build the masks of every
sparsity, evaluate each pruned model against the dense one), the report and plots it writes
(`report`), the models it can load (`zoo`) and the text that ships with Python used to calibrate and
evaluate the default model offline (`textdata`). The library (`pyprune_fast.*` outside `app`) never
imports this package.
"""
