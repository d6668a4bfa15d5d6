"""Evaluations of StreamingLLM's quality, on top of the core (the core never imports them).

* :mod:`.perplexity` -- the paper's streaming-perplexity evaluation: dense, window, sliding
  window with re-computation and StreamingLLM scored token by token on one long text;
  :mod:`.report` writes its tables, CSV files and figures;
* :mod:`.corpus` -- the long texts: Jane Austen's novels, files or stdin, Hugging Face datasets;
* :mod:`.cli` -- the ``streamingllm perplexity`` command.

Attention maps, StreamEval and passkey retrieval are to join them here. Their optional
packages (rdata, datasets, matplotlib) are imported only where used, naming their extra.
"""
