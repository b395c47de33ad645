"""The corpus read: documents from files (local or object storage, compressed or not) or a
Hugging Face dataset, in this process or as a Ray Dataset, every row's text or why it has
none (files.BadRow), which the consumers count and skip. It knows nothing of new tokens or
snippets: mining (data.mining) and the output fit read it.

Modules:
  source        what reading one kind of source takes (CorpusReader): its key, its documents
                in this process, its Ray Data read tasks in the seeded order
  sources       the one place that tells sources apart: each settings class's reader
  file_source   FileDataSource: files local or in object storage, in parts
  hub_source    HFDataSource: a Hugging Face dataset streamed, one read task per shard
  files         the one corpus file reader: paths, globs and URIs resolved, a file's texts
                by its kind (parquet, JSONL, whole-file text), bad rows and their reasons
  chunks        text cut into chunks of at most so many UTF-8 bytes, at line breaks
  corpus        documents streamed in this process (documents), and a text sample
                spread over the corpus (text_sample, for the output fit)
  corpus_parts  the corpus cut into parts, and a part read into Arrow blocks: one Ray
                Data read task's work
  ray_corpus    any source as a Ray Dataset of documents, one read task per part (or per
                HF shard), in the seeded order the miners rely on
"""
