"""Shared fixtures: the real embedded models (loaded once per session) and a tiny random Llama for fast unit tests."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium, installed by scripts/setup.sh; never a downloaded browser
# as root, headless, and with nothing that calls out to the network (this machine's network is closed)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("QFILTERS_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep files a person may want to look at after a run (plots, screenshots)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium context driven by playwright, shared by the report and the registry page tests."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (scripts/setup.sh installs it)")
    import tempfile

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="qfilters-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1200, "height": 900}, java_script_enabled=True)
        try:
            yield context
        finally:
            context.close()


def _quiet() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def smollm2():
    from qfilters.models import load_model

    _quiet()
    return load_model("smollm2")


@pytest.fixture(scope="session")
def gemma3():
    from qfilters.models import load_model

    _quiet()
    return load_model("gemma3")


def char_tokenizer():
    """An offline character-level tokenizer (no Hub): good enough to drive calibration on a tiny model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<s>", "</s>", "<pad>"] + list(string.printable)
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_llama():
    """A random 2-layer Llama with GQA (4 query heads, 2 KV heads), wrapped like a loaded model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qfilters.models import LoadedModel, describe

    _quiet()
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, info=describe(model, "tiny-llama", None, "random init"))
