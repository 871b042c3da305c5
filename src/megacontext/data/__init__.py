"""Data pipeline: sources -> tokenizer -> Arrow shards + manifest; window sampler; passkeys and training tasks."""

from megacontext.data.passkey import (
    EVAL_FACTS,
    EVAL_TEMPLATE,
    FactTemplate,
    PasskeyExample,
    PasskeyTemplate,
    make_multikey,
    make_passkey,
)
from megacontext.data.prepare import SPLITS, PreparedDataset, dataset_dir, load_base_tokenizer, prepare_dataset
from megacontext.data.sampler import Window, WindowSampler, sample_blocks
from megacontext.data.tasks import TaskMixture

__all__ = [
    "EVAL_TEMPLATE",
    "SPLITS",
    "EVAL_FACTS",
    "FactTemplate",
    "PasskeyExample",
    "PasskeyTemplate",
    "PreparedDataset",
    "TaskMixture",
    "Window",
    "WindowSampler",
    "sample_blocks",
    "dataset_dir",
    "load_base_tokenizer",
    "make_multikey",
    "make_passkey",
    "prepare_dataset",
]
