"""Data pipeline: sources -> tokenizer -> Arrow shards + manifest; window sampler; passkeys."""

from megacontext.data.passkey import PasskeyExample, make_passkey, passkey_training_sequence
from megacontext.data.prepare import SPLITS, PreparedDataset, dataset_dir, load_base_tokenizer, prepare_dataset
from megacontext.data.sampler import Window, WindowSampler

__all__ = [
    "SPLITS",
    "PasskeyExample",
    "PreparedDataset",
    "Window",
    "WindowSampler",
    "dataset_dir",
    "load_base_tokenizer",
    "make_passkey",
    "passkey_training_sequence",
    "prepare_dataset",
]
