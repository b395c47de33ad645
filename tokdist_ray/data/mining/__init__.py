"""What is found in the corpus with the expanded tokenizer: snippets around the new tokens
(mining, on Ray Data or in this process), and the pre-token counts continued BPE selects
new tokens from. It reads the corpus through data.corpus and writes snippets in
data.snippets' schema, within data.budget's quotas; it does not import generation.

Modules:
  matching          find new tokens in documents: surface strings first (Aho-Corasick),
                    token ids to confirm (TokenScanner)
  quota             the quota ledger: which mined snippets a run keeps, the same on Ray and
                    in this process
  miner             the mining actors' side: the Ray Data UDF (SnippetMiner), the tokenizer
                    it is shipped (TokenizerSpec), the QuotaBoard of full tokens
  mining_cache      the mining cache: results kept under a key of the corpus, tokenizer,
                    tokens and settings, read back by a rerun
  mining            corpus -> snippets on Ray Data (mine_corpus), the driver over the miners
  local_mining      the in-process miner (mine_snippets): the API without Ray, and the
                    held-out evaluation
  pre_token_counts  pre-token counts of a corpus (count_pre_tokens), on Ray Data with the
                    miners' shipped tokenizer, for continued BPE (vocab.bpe_training)
"""
