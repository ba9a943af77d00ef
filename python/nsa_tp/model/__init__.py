"""DeepSeek-V3.2 attention layer (MLA + indexer) sharded for pure TP, partial and full DP attention."""
