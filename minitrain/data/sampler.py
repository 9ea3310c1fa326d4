"""The order in which samples are trained: an infinite, seeded, resumable stream of sample indices.

Owns the one rule every rank follows: epoch `e` visits the samples in the order
`numpy.random.default_rng([seed, e]).permutation(num_samples)`, and the epochs follow each other
without a seam (a global batch may end one epoch and start the next). The sampler yields GLOBAL batches;
ranks split them with `minitrain.data.packing.plan_minibatches`, so the sequence of samples does not
depend on the number of ranks and a run resumed on a different world size trains exactly the samples
the uninterrupted run would have.

`--validation-split F` (`split_validation`) holds out `floor(F x num_samples)` samples before any of this: the
sampler is then given the trained ids (`ids`) and permutes positions into them, so a held-out sample is never
drawn, and the split, drawn from the seed alone, is the same on every rank and any `--nproc`.

`StopRule` says when the stream ends (steps, samples, epochs or tokens); the training loop and
`train --dry-run` share it.

Trade-off: the state is three integers (seed, epoch, position) instead of a saved index list, at the
price of recomputing one permutation (about 20 ms per million samples) per epoch and after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minitrain.errors import UserError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch `epoch`: int64 [num_samples], the same on every rank and machine."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


VALIDATION_STREAM = 0x76616C69  # the held-out draw's RNG key beside the seed (epochs use [seed, e])


def split_validation(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`--validation-split`: (trained ids, held-out ids), each sorted int64. The held-out ones are the first
    `floor(fraction x num_samples)` of `default_rng([seed, VALIDATION_STREAM]).permutation(num_samples)`: a
    function of the seed and the sample index alone, the same on every rank, machine and world size."""
    held = math.floor(fraction * num_samples)  # < num_samples, as fraction < 1
    if held < 1:
        raise UserError(
            f"--validation-split {fraction:g} of {num_samples} samples holds out none; raise it to at least "
            f"{1 / num_samples:.4g} (one sample), or pass --eval-data-path"
        )
    order = np.random.default_rng([seed, VALIDATION_STREAM]).permutation(num_samples)
    return np.sort(order[held:]), np.sort(order[:held])


@dataclass
class InfiniteSampler:
    """Seeded, reshuffled-every-epoch, endless sampler of sample indices; the same sequence on every rank."""

    num_samples: int
    seed: int
    epoch: int = 0
    position: int = 0  # index into the current epoch's permutation, 0 <= position < num_samples
    ids: np.ndarray | None = field(default=None, repr=False, compare=False)  # the sample id of each position
    # (--validation-split: the trained ids, num_samples of them); None: position p is sample p
    _perm: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _perm_epoch: int = field(default=-1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise UserError("the sampler needs at least one sample; the data file has none left to train on")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.epoch < 0 or not 0 <= self.position <= self.num_samples:
            raise UserError(
                f"invalid sampler state epoch={self.epoch} position={self.position} for "
                f"{self.num_samples} samples; the checkpoint does not belong to this data file"
            )
        if self.ids is not None and len(self.ids) != self.num_samples:
            raise UserError(f"the sampler has {len(self.ids)} ids for {self.num_samples} samples")
        if self.position == self.num_samples:  # normalise the end of an epoch to the start of the next
            self.epoch, self.position = self.epoch + 1, 0

    @classmethod
    def at(cls, num_samples: int, seed: int, samples_consumed: int) -> InfiniteSampler:
        """A sampler that has already handed out `samples_consumed` indices."""
        if samples_consumed < 0:
            raise UserError(f"samples_consumed must be >= 0, got {samples_consumed}")
        epoch, position = divmod(samples_consumed, max(num_samples, 1))
        return cls(num_samples=num_samples, seed=seed, epoch=epoch, position=position)

    @property
    def samples_consumed(self) -> int:
        """Indices handed out since epoch 0, position 0."""
        return self.epoch * self.num_samples + self.position

    @property
    def epochs_consumed(self) -> float:
        """Fractional number of passes over the data (1.5 = one full epoch and half of the next)."""
        return self.samples_consumed / self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of `epoch` (cached for the current epoch)."""
        if self._perm is None or self._perm_epoch != epoch:
            self._perm = epoch_permutation(self.num_samples, self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self, batch_size: int) -> list[int]:
        """The next `batch_size` sample indices (a global batch); crosses epoch boundaries seamlessly."""
        if batch_size <= 0:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        parts: list[np.ndarray] = []
        need = batch_size
        while need:
            take = min(need, self.num_samples - self.position)
            parts.append(self.permutation(self.epoch)[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
        batch = np.concatenate(parts)
        return (batch if self.ids is None else self.ids[batch]).tolist()

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume: four integers, JSON-safe."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any], ids: np.ndarray | None = None) -> InfiniteSampler:
        """Rebuild a sampler from `state_dict()` (and the trained `ids` it was built with); independent of
        the number of ranks."""
        try:
            return cls(
                num_samples=int(d["num_samples"]),
                seed=int(d["seed"]),
                epoch=int(d["epoch"]),
                position=int(d["position"]),
                ids=ids,
            )
        except KeyError as err:
            raise UserError(f"sampler state is missing {err}; the checkpoint is incomplete") from None


@dataclass(frozen=True)
class StopRule:
    """When training ends; all None means never (until interrupted).

    `max_tokens` counts the tokens of the trained samples (every token of each, prompt included: the
    metrics' `num_total_tokens`); it is checked before each step, so the last step may pass it by up to
    one global batch.
    """

    max_steps: int | None = None
    max_samples: int | None = None
    max_epochs: float | None = None
    max_tokens: int | None = None

    def reached(self, *, steps: int, samples_seen: int, epochs: float, tokens_seen: int = 0) -> bool:
        """True once `steps` optimizer steps, `samples_seen` trained samples, `epochs` passes or
        `tokens_seen` trained tokens reach a limit."""
        return (
            (self.max_steps is not None and steps >= self.max_steps)
            or (self.max_samples is not None and samples_seen >= self.max_samples)
            or (self.max_epochs is not None and epochs >= self.max_epochs - 1e-12)
            or (self.max_tokens is not None and tokens_seen >= self.max_tokens)
        )
