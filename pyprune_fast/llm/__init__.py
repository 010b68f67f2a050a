"""Pruning Hugging Face causal LMs the way their users do: decoder blocks one at a time on the compute
device, calibrated by the inputs each block actually sees, judged by perplexity.

    from pyprune_fast import llm
    model, tokenizer = llm.load_smollm2()                      # embedded SmolLM2-135M, offline
    calib = llm.pydoc_tokens(tokenizer, "calibration")
    result = llm.prune(model, calib, method="sparsegpt", sparsity="2:4", num_samples=32, seq_len=1024)
    print(result.summary())
    print(llm.perplexity(model, llm.pydoc_tokens(tokenizer, "evaluation"), seq_len=1024))
    llm.save_pretrained(model, tokenizer, "out/sparsegpt-2:4")

Methods: magnitude, wanda, sparsegpt (OBS update), and block-local snip, refer, afr, feature_l1;
OWL non-uniform block sparsity for any of them (`owl=llm.OWL(M=5, lam=0.08)`); whole-model sparsity
(granularity="global"); models larger than memory streamed from and to disk (offload="disk", out=,
resume=; llm.offload); several processes (group=, torchrun). Structured pruning (smaller dense
models): llm.prune_structured, recovered by llm.distill (logit KL to the dense model). transformers
(and gguf for the embedded model) are imported only by the functions that need them."""

from .blocks import BlockInputs, block_linears, capture_inputs, find_blocks
from .distill import distill
from .methods import METHODS
from .models import is_causal_lm, load_causal_lm, load_smollm2, smollm2_checkpoint, smollm2_gguf
from .owl import OWL
from .perplexity import perplexity
from .pipeline import MemoryEstimate, PruneResult, prune, scores
from .save import save_pretrained
from .sparsity import Pattern, parse_sparsity
from .structured import StructuredResult, load_pretrained, prune_structured, structure_of
from .structured.experts import ExpertResult, prune_experts
from .text import calibration_windows, pydoc_text, pydoc_tokens

__all__ = [
    "METHODS",
    "OWL",
    "BlockInputs",
    "ExpertResult",
    "MemoryEstimate",
    "Pattern",
    "PruneResult",
    "StructuredResult",
    "block_linears",
    "calibration_windows",
    "capture_inputs",
    "distill",
    "find_blocks",
    "is_causal_lm",
    "load_causal_lm",
    "load_pretrained",
    "load_smollm2",
    "parse_sparsity",
    "perplexity",
    "prune",
    "prune_experts",
    "prune_structured",
    "pydoc_text",
    "pydoc_tokens",
    "save_pretrained",
    "scores",
    "smollm2_checkpoint",
    "smollm2_gguf",
    "structure_of",
]
