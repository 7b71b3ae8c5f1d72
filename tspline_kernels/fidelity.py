"""How close a compressed sentence-embedding model stays to its original: embeddings, cosines,
nearest-neighbour agreement, and the tokenized batches and forward that ``heal`` distils with.

Works with any sentence-transformers model (``encode``, ``tokenize``, a forward returning
``sentence_embedding``); used by ``tspline compare``, ``tspline compress --heal-steps`` and the
benchmarks ``bench/fidelity.py`` and ``bench/decoupling.py``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def embed(model: nn.Module, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm float32 sentence embeddings ``(len(sentences), d)`` of a SentenceTransformer, on the CPU."""
    out = model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return out.float().cpu()


def cosines(reference: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Per-row cosine between two ``(n, d)`` embedding sets, float64 ``(n,)``."""
    return F.cosine_similarity(embeddings.double(), reference.double(), dim=-1)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """For each row of ``(n, d)`` embeddings, the index of the most cosine-similar other row ``(n,)``."""
    unit = F.normalize(embeddings.double(), dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-torch.inf)
    return sim.argmax(dim=1)


def nn_agreement(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Fraction of rows whose nearest neighbour (among the other rows) is the same in both sets."""
    return (nearest_neighbours(reference) == nearest_neighbours(embeddings)).double().mean().item()


def fidelity(reference: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    """``mean_cosine`` and ``min_cosine`` to the reference embeddings, and ``nn_agreement``."""
    if reference.shape != embeddings.shape or reference.dim() != 2 or reference.shape[0] < 2:
        raise ValueError(f"fidelity compares two (n >= 2, d) embedding sets of one shape, got "
                         f"{tuple(reference.shape)} and {tuple(embeddings.shape)}")
    c = cosines(reference, embeddings)
    return {"mean_cosine": c.mean().item(), "min_cosine": c.min().item(),
            "nn_agreement": nn_agreement(reference, embeddings)}


def tokenized(model: nn.Module, sentences: Sequence[str], batch_size: int, seed: int = 0) -> list[dict]:
    """Tokenized batches for :func:`sentence_embedding`: sentences grouped by length (little
    padding), the batches in a shuffled order."""
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    ordered = sorted(sentences, key=len)
    batches = [tokenize(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def sentence_embedding(model: nn.Module, batch: dict) -> torch.Tensor:
    """The ``heal`` forward for a SentenceTransformer: its sentence embeddings ``(batch, d)`` of a
    tokenized batch (the dict is copied: the model adds its outputs to the dict it gets)."""
    return model(dict(batch))["sentence_embedding"]
