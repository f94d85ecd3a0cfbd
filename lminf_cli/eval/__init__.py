"""Length generalisation, measured: the unmodified-model baselines, perplexity by position,
passkey retrieval, and the charts of those and of the bench.

  * baseline.py: the unmodified model within a budget (dense, or re-reading a window);
  * ppl.py: per-token NLL of each method, buckets by position, the report;
  * passkey.py: Mohtashami & Jaggi's passkey prompts and their accuracy grid;
  * plots.py: matplotlib charts (optional extra).

Nothing here prints; progress goes through an optional callback.
"""
