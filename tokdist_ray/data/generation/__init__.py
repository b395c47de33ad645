"""Generated snippets: the model writes contexts that start with each new token's phrase.

One request is one sample: the prompt `[BOS] + phrase ids` (no BOS where the tokenizer has
none), up to `snippet_len` new ids, cut at the first EOS. Samples with fewer than
`min_new_tokens` new ids are dropped and counted; up to `refill_rounds` further rounds
replace them with fresh samples, so a token normally ends with exactly the count asked.
A kept sample becomes a snippet as every snippet is made: its text encoded by the
expanded tokenizer (requests.expanded_snippets); a sample where that tokenizer does not
emit the token (the model went on with letters of the same word) is dropped and counted.

Determinism: each sample has its own seed, derived from (seed, token text, sample index),
and its own random stream, drawn by the exponential race (as vLLM draws). So a sample does
not depend on which other tokens run, on batch size or order, or on the number of actors:
the logits of one prompt differ between batch shapes only by rounding, which flips a draw
only where two ids tie within rounding (not seen in the tests). The same inputs on the
same hardware give bit-identical snippets. vLLM gets the same per-sample seeds and is
reproducible for one vLLM version and GPU type (set VLLM_BATCH_INVARIANT=1 on Hopper and
newer to remove its batch dependence too); its snippets differ from the CPU backend's,
whose kernels differ.

Modules, top to bottom: the in-process entry, the Ray driver, the stages it runs and its own
parts (none imports another), then what they share (pyproject.toml's import-linter contract
keeps these layers, without cycles):
  local          generate_snippets(model, expansion, ...): in-process, on the model the API holds
  ray_backend    generate_snippets_on_ray(model_path, ...): the driver, which runs the passes
                 of a Ray Data stage until the round ledger settles; the snippets stay on the
                 cluster and are written from there (or brought back: generate_snippet_table)
  vllm_backend   the vLLM stage (ray.data.llm)
  transformers_backend  the transformers stage: a pool of CPU actors running the sampling loop
  backend        which backend runs (vLLM where installed and GPUs are up or launchable), and
                 how many vLLM replicas of how many GPUs
  settling       the samples each token keeps become snippets in Ray Data, in a fixed order;
                 GeneratedSnippets writes them as parquet parts from the workers
  sampling       the CPU sampling loop
  requests       requests, rounds in process, stats, the columnar settling, the Ray backends'
                 raw samples: shared by every backend
  rounds         the round ledger: which samples each token keeps, settled in passes
  model_source   the model name resolved where an engine runs; stop ids read without weights
"""
