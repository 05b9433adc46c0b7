"""Shared fixtures: tiny Llama and BERT model directories (with tokenizers), text files, one torch thread;
the hypothesis settings profile."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from sample_texts import TEXTS

from weightkit.models import default_model_path, load_model
from weightkit.testing import save_tiny, tiny_bert, tiny_llama, tiny_tokenizer

# Property tests (tests/reliability/test_fuzz*.py) draw the same examples on every run, so CI never fails by
# chance and a failure reproduces; WEIGHTKIT_FUZZ_EXAMPLES=2000 makes a long run. No example database: a
# test's examples do not depend on earlier runs.
settings.register_profile(
    "weightkit",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=int(os.environ.get("WEIGHTKIT_FUZZ_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("weightkit")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A saved 2-layer Llama (hidden 32, vocabulary 128) with a BPE tokenizer."""
    return save_tiny(tiny_llama(seed=0), tmp_path_factory.mktemp("llama") / "model", tiny_tokenizer(128))


@pytest.fixture(scope="session")
def quantized_llama_dir(llama_dir, tmp_path_factory):
    """``llama_dir`` compressed by weightkit to 4 bits (RTN, group size 32): a pack-quantized checkpoint."""
    from weightkit.compress import RTNConfig, compress_checkpoint

    out = tmp_path_factory.mktemp("quantized-llama") / "model"
    return compress_checkpoint(llama_dir, out, RTNConfig(bits=4, group_size=32), progress=False)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A saved 2-layer BERT encoder (hidden 32, vocabulary 128) with a BPE tokenizer."""
    tokenizer = tiny_tokenizer(128, kind="encoder")
    return save_tiny(tiny_bert(seed=0), tmp_path_factory.mktemp("bert") / "model", tokenizer)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A .txt file of passages separated by blank lines."""
    path = tmp_path_factory.mktemp("text") / "passages.txt"
    path.write_text("\n\n".join(TEXTS))
    return path


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 (model, tokenizer); tests must not modify the model in place."""
    model, tokenizer, _ = load_model(default_model_path())
    return model, tokenizer


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``): tiny models
    run many small operations, and on a shared 2-core machine one thread is several times faster than two
    that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
