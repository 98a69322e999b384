"""Shared test setup: offline hub, one torch thread, helpers that build client updates from raw LoRA factors,
the real-data sample ``rt_csv`` with a tiny run config on it, and tiny BERT / GPT-2 models."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@dataclass(frozen=True)
class RawClient:
    """One client's adapter as PEFT holds it: per module B (d, r), A (r, k), with the LoRA scale s kept apart."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    rank: int
    rslora: bool

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = s·B·A in float64: the dense definition every aggregation is checked against."""
        B, A = self.factors[module]
        return self.scale * B.double() @ A.double()

    def canonical(self):
        from fedlora.types import LowRank

        return {m: LowRank(self.scale * B, A) for m, (B, A) in self.factors.items()}


def make_clients(
    shapes: dict[str, tuple[int, int]],
    ranks: Sequence[int],
    alpha: float,
    rslora: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[RawClient]:
    """Random clients; B is not zero (trained), modules non-square as the shapes say."""
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for r in ranks:
        factors = {
            m: (
                torch.randn(d, r, generator=gen, dtype=dtype),
                torch.randn(r, k, generator=gen, dtype=dtype) / math.sqrt(k),
            )
            for m, (d, k) in shapes.items()
        }
        clients.append(RawClient(factors, alpha, r, rslora))
    return clients


def ideal(clients: Sequence[RawClient], weights: torch.Tensor, module: str) -> torch.Tensor:
    """Σ_u w_u s_u B_u A_u, dense, float64."""
    return sum(float(w) * c.delta(module) for w, c in zip(weights, clients, strict=True))


@pytest.fixture(scope="session")
def rt_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded 240-example sample of the real packaged Rotten Tomatoes data as a local CSV (string labels), so
    integration runs on the real MiniLM evaluate in seconds."""
    import pandas as pd

    from fedlora.data import load_dataset

    ds = load_dataset("fedlora:rotten-tomatoes")
    idx = torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(0))[:240].tolist()
    path = tmp_path_factory.mktemp("data") / "rt_sample.csv"
    frame = pd.DataFrame({"text": [ds.texts[i] for i in idx], "label": [ds.label_names[ds.labels[i]] for i in idx]})
    frame.to_csv(path, index=False)
    return path


def tiny_config(rt_csv: Path, out: Path, *extra: str) -> Any:
    """2 clients × 2 rounds × 2 local steps of batch 8 on the ``rt_csv`` sample and the packaged MiniLM, in the main
    process (``federation.workers = 0``), run directory ``out``; ``extra`` overrides come last and win."""
    from fedlora import config

    base = [f"data.dataset={rt_csv}", "data.num_clients=2", "data.max_length=32", "federation.rounds=2"]
    base += ["train.local_steps=2", "train.batch_size=8", f"output.dir={out}", "federation.workers=0"]
    return config.load_config(None, [*base, *extra])


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl, one dict per round."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_bert() -> Any:
    """A seeded 2-layer BERT sequence classifier (hidden 32, 3 labels), in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=100, num_labels=3
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_peft(dropout: float = 0.0, variant: str = "lora") -> Any:
    """A seeded 1-layer BERT classifier (hidden 32, vocabulary 50, 2 labels) with a PEFT adapter of rank 4 on query
    and value: LoRA with α = 6 (or ``variant`` "dora" / "hira"), dropout ``dropout``."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora import peft_io

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40, vocab_size=50, num_labels=2
    )
    return peft_io.make_peft_model(
        BertForSequenceClassification(cfg),
        r=4,
        alpha=6.0,
        dropout=dropout,
        rslora=False,
        target_modules=["query", "value"],
        variant=variant,
        task="seq_cls",
    )


def tiny_gpt2() -> Any:
    """A seeded 2-layer GPT-2 LM (Conv1D layers, (in, out) weight layout), in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


RT_TEST_EXAMPLES = 48
"""The global test examples of ``rt_csv`` under ``tiny_config``: round(240 · data.test_fraction = 0.2)."""


def assert_counted(accuracy: float, n: int = RT_TEST_EXAMPLES) -> None:
    """An accuracy counted over n examples is k/n for an integer 0 ≤ k ≤ n; a value out of range, one measured on
    another number of examples, or an average of unequal batches' accuracies generally is not."""
    k = round(accuracy * n)
    assert 0 <= k <= n and abs(accuracy - k / n) <= 1e-9, f"accuracy {accuracy!r} is not a count out of {n}"


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The ChatML template (as SmolLM2's, without its default system turn)."""


def tiny_tokenizer(chat_template: str | None = CHATML) -> Any:
    """A byte-level tokenizer with no merges (vocabulary: the 256 byte symbols and three special tokens,
    ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), eos ``<|im_end|>``, and ``chat_template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=chat_template,
    )


def tiny_llama(vocab_size: int, seed: int = 0, initializer_range: float = 0.02, tied: bool = True) -> Any:
    """A seeded 2-layer Llama LM (hidden 32, grouped-query attention, tied embeddings unless ``tied`` is False), in
    eval mode. With the default small initialisation it mostly repeats its input; a larger ``initializer_range``
    and untied embeddings give varied greedy continuations."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=initializer_range,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (initialisation 0.2, untied: a model LoRA on q_proj, v_proj moves within a few steps)
    with the byte-level ChatML tokenizer, saved as a Hugging Face directory (what ``model.name`` names, so worker
    processes and Flower nodes load it too)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer), initializer_range=0.2, tied=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sums_jsonl(path: Path, n: int = 240, seed: int = 0) -> Path:
    """``n`` one-digit sums and differences as prompt/response rows with an ``op`` column (``add`` or ``sub``),
    as a JSON Lines file."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randrange(10), rng.randrange(10), rng.choice(["add", "sub"])
        question = f"{a}+{b}=" if op == "add" else f"{a}-{b}="
        rows.append({"prompt": question, "response": str(a + b if op == "add" else a - b), "op": op})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def causal_config(model_dir: Path, data: Path, out: Path, *extra: str) -> Any:
    """A few-second causal-LM run: the tiny Llama on ``data``, 2 clients partitioned by ``op``, 3 rounds of 4 steps
    at lr 3e-2, in the main process; ``extra`` overrides come last and win."""
    from fedlora import config

    base = [
        "model.task=causal_lm",
        f"model.name={model_dir}",
        "model.precision=fp32",
        f"data.dataset={data}",
        "data.partition_by=op",
        "data.alpha=1.0",
        "data.num_clients=2",
        "data.max_length=48",
        "data.test_fraction=0.2",
        "federation.rounds=3",
        "train.local_steps=4",
        "train.batch_size=8",
        "train.lr=3e-2",
        "eval.max_new_tokens=4",
        f"output.dir={out}",
        "federation.workers=0",
    ]
    return config.load_config(None, [*base, *extra])
