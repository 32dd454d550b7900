"""Input pipeline: document sources, tokenizers, packing and the grain pipelines."""

from mx01.data.packing import PackedRowsIterDataset, packing_efficiency, stack_rows
from mx01.data.pipeline import DataPipeline
from mx01.data.sources import DataError, open_source, split_indices, stdlib_corpus
from mx01.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
