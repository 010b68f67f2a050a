"""The `pyprune-fast` application, apart from the library: the command line (`cli`, one module per
command over one validated options object), the runners behind `pyprune-fast prune` (`runner`: score
once per criterion, build the masks of every sparsity, evaluate each pruned model against the dense
one; `llm_runner`: the same for causal LMs, block by block), the schedule and fine-tuning rules they
share (`refinement`), what they run on and produce (`bundle`, `results`), the report and plots
(`report`), the models it can load (`zoo`), the user's data files (`data`) and the text that ships
with Python used to calibrate and evaluate the default model offline (`textdata`). The library
(`pyprune_fast.*` outside `app`) never imports this package.
"""
