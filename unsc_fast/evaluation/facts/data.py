"""The fictitious-facts task: a TOFU-like corpus generated locally from a seed (no download).

Persons have one value per relation (drawn at random from that relation's values), stated in
three templates; a model trained on it to 100 % has memorised every fact. Unlearning forgets
every fact of a few persons. Token layout (one token per word, no tokenizer):

    template 0   [BOS] P R V [EOS]
    template 1   [BOS] R of P is V [EOS]
    template 2   [BOS] P 's R = V [EOS]
    copy         [BOS] COPY a b c d SEP a b c d [EOS]      (held-out 4-tuples are the test)
    successor    [BOS] SUCC a a+1 a+2 a+3 [EOS]             (symbols mod S, every start)

Persons are split into forget / validation (picks the learning rate) / unseen (never shown
to the unlearner) / retain (the unlearner's retain data). The general tasks measure skills
that unlearning a few persons must not break.

Truth ratio (TOFU, Maini et al. 2024) needs a paraphrased and perturbed answers per
question. Here a question is a fact (person, relation) asked in every template; the
*paraphrased* answer is the true value asked through all three templates (the same fact in
other words: one probability per template, averaged per token as TOFU's
``exp(-avg_loss)``), and the *perturbed* answers are ``perturbed`` other values of the same
relation (wrong answers of the right type), fixed per fact by the seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD, BOS, EOS, COPY, SEP, SUCC = range(6)
OF, IS, POSSESSIVE, EQUALS = range(6, 10)
FIRST_FREE = 10
SPLITS = ("forget", "validation", "unseen", "retain")
TEMPLATES = 3


@dataclass(frozen=True)
class FactsSpec:
    """The task's sizes. The defaults are the issue's: 200 persons x 4 relations x 3 templates."""

    persons: int = 200
    relations: int = 4
    values_per_relation: int = 16
    forget: int = 20
    validation: int = 20
    unseen: int = 20
    symbols: int = 32           # the general tasks' alphabet
    copy_train: int = 400       # copy 4-tuples trained on
    copy_test: int = 200        # held-out 4-tuples (the copy skill, not memorised pairs)
    perturbed: int = 5          # wrong answers per fact (truth ratio)

    def __post_init__(self) -> None:
        if self.forget + self.validation + self.unseen >= self.persons:
            raise ValueError(f"FactsSpec: forget + validation + unseen persons ({self.forget} + {self.validation} "
                             f"+ {self.unseen}) must leave retain persons out of {self.persons}")
        if not 0 < self.perturbed < self.values_per_relation:
            raise ValueError(f"FactsSpec: perturbed must be in [1, values_per_relation - 1], got {self.perturbed}")
        if min(self.forget, self.validation, self.unseen, self.relations, self.symbols, self.copy_test) < 1:
            raise ValueError("FactsSpec: every split, relations, symbols and copy_test need at least 1")


@dataclass(frozen=True)
class Vocabulary:
    """Where each kind of token starts (every id below ``size``)."""

    spec: FactsSpec

    @property
    def relation0(self) -> int:
        return FIRST_FREE

    @property
    def value0(self) -> int:
        return self.relation0 + self.spec.relations

    @property
    def symbol0(self) -> int:
        return self.value0 + self.spec.relations * self.spec.values_per_relation

    @property
    def person0(self) -> int:
        return self.symbol0 + self.spec.symbols

    @property
    def size(self) -> int:
        return self.person0 + self.spec.persons

    def person(self, index):
        return self.person0 + index

    def relation(self, index):
        return self.relation0 + index

    def value(self, relation, index):
        return self.value0 + relation * self.spec.values_per_relation + index


@dataclass
class Sequences:
    """Padded token sequences (right padding) and where their graded answers are.

    ``labels`` follow Hugging Face (``-100``: not trained on); ``answer_positions`` (N, A)
    index the graded tokens in ``input_ids`` (the value of a fact, the copied or successor
    symbols), ``answers`` (N, A) hold them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    answer_positions: torch.Tensor
    answers: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, index: torch.Tensor) -> "Sequences":
        return Sequences(*(t[index] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.attention_mask, self.labels, self.answer_positions, self.answers)

    def batch(self, index=None) -> dict[str, torch.Tensor]:
        """A Hugging Face batch (``input_ids``, ``attention_mask``, ``labels``), trimmed to
        its longest sequence."""
        part = self if index is None else self.subset(index)
        length = int(part.attention_mask.sum(1).max()) if len(part) else 0
        return {"input_ids": part.input_ids[:, :length], "attention_mask": part.attention_mask[:, :length],
                "labels": part.labels[:, :length]}

    @staticmethod
    def concat(parts: list["Sequences"]) -> "Sequences":
        """One set from several (training sets); answer columns are padded with -1."""
        width = max(p.input_ids.shape[1] for p in parts)
        answers = max(p.answers.shape[1] for p in parts)
        padded = [_pad_to(p, width, answers) for p in parts]
        return Sequences(*(torch.cat(ts) for ts in zip(*(p.tensors() for p in padded))))


def _pad_to(part: Sequences, width: int, answers: int) -> Sequences:
    def pad(t, size, value):
        return torch.cat([t, t.new_full((t.shape[0], size - t.shape[1]), value)], 1)
    return Sequences(pad(part.input_ids, width, PAD), pad(part.attention_mask, width, 0),
                     pad(part.labels, width, -100), pad(part.answer_positions, answers, -1),
                     pad(part.answers, answers, -1))


def _sequences(rows: list[list[int]], answer_positions: list[list[int]], answer_only: bool) -> Sequences:
    """Pad ``rows``; labels are the tokens (all of them, or only the answers and the final EOS)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    positions = torch.tensor(answer_positions, dtype=torch.long)
    labels = ids.masked_fill(mask == 0, -100)
    if answer_only:  # the question is context, not a target (OpenUnlearning's QA labels)
        graded = torch.zeros_like(mask, dtype=torch.bool)
        graded.scatter_(1, positions, True)
        graded[torch.arange(len(rows)), mask.sum(1) - 1] = True  # the EOS closing the answer
        labels = labels.masked_fill(~graded, -100)
    return Sequences(ids, mask, labels, positions, ids.gather(1, positions))


@dataclass
class FactsTask:
    """One draw of the task: the facts, the person splits, the perturbed answers and the
    general tasks' sequences. Everything follows from ``(spec, seed)``."""

    spec: FactsSpec
    seed: int
    values: torch.Tensor = field(init=False)      # (persons, relations): value index per fact
    perturbed: torch.Tensor = field(init=False)   # (persons, relations, spec.perturbed): wrong value indices
    splits: dict = field(init=False)              # split name -> person indices
    copy_tuples: torch.Tensor = field(init=False)  # (copy_train + copy_test, 4) symbol indices

    def __post_init__(self) -> None:
        spec = self.spec
        generator = torch.Generator().manual_seed(self.seed)
        self.vocab = Vocabulary(spec)
        self.values = torch.randint(spec.values_per_relation, (spec.persons, spec.relations), generator=generator)
        # wrong answers: a random draw of the other values (shift by 1..V-1 without repeats)
        shifts = torch.rand(spec.persons, spec.relations, spec.values_per_relation - 1,
                            generator=generator).argsort(-1)[..., : spec.perturbed] + 1
        self.perturbed = (self.values.unsqueeze(-1) + shifts) % spec.values_per_relation
        order = torch.randperm(spec.persons, generator=generator)
        sizes = (spec.forget, spec.validation, spec.unseen)
        bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes), spec.persons]
        self.splits = {name: order[bounds[i]:bounds[i + 1]].sort().values for i, name in enumerate(SPLITS)}
        self.copy_tuples = _distinct_tuples(spec.copy_train + spec.copy_test, spec.symbols, generator)

    # facts -------------------------------------------------------------------
    def persons(self, *splits: str) -> torch.Tensor:
        unknown = [s for s in splits if s not in self.splits]
        if unknown:
            raise KeyError(f"unknown split(s) {unknown}; the splits are {SPLITS}")
        return torch.cat([self.splits[s] for s in splits]).sort().values

    def fact_rows(self, person: int, relation: int, value_index: int) -> list[tuple[list[int], int]]:
        """The three templates stating ``relation`` of ``person`` is value ``value_index``,
        each with the position of the value."""
        v = self.vocab
        p, r, value = v.person(person), v.relation(relation), v.value(relation, value_index)
        return [([BOS, p, r, value, EOS], 3),
                ([BOS, r, OF, p, IS, value, EOS], 5),
                ([BOS, p, POSSESSIVE, r, EQUALS, value, EOS], 5)]

    def facts(self, persons: torch.Tensor, answer_only: bool = False) -> Sequences:
        """Every fact of ``persons`` in every template: ordered person, relation, template."""
        rows, positions = [], []
        for person in persons.tolist():
            for relation in range(self.spec.relations):
                for row, position in self.fact_rows(person, relation, int(self.values[person, relation])):
                    rows.append(row)
                    positions.append([position])
        return _sequences(rows, positions, answer_only)

    def answer_candidates(self, persons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(true, wrong)`` value tokens per row of ``facts(persons)``: (N,) and (N, perturbed)."""
        v = self.vocab
        relations = torch.arange(self.spec.relations)
        true = v.value(relations, self.values[persons])                       # (P, R)
        wrong = v.value(relations[:, None], self.perturbed[persons])          # (P, R, K)
        repeat = lambda t: t.repeat_interleave(TEMPLATES, dim=1).flatten(0, 1)  # noqa: E731 - one row per template
        return repeat(true), repeat(wrong)

    # general tasks -----------------------------------------------------------
    def copy(self, part: str) -> Sequences:
        """``part``: ``"train"`` or ``"test"`` (held-out 4-tuples)."""
        tuples = self.copy_tuples[: self.spec.copy_train] if part == "train" else self.copy_tuples[self.spec.copy_train:]
        symbols = (tuples + self.vocab.symbol0).tolist()
        rows = [[BOS, COPY, *s, SEP, *s, EOS] for s in symbols]
        return _sequences(rows, [[7, 8, 9, 10]] * len(rows), answer_only=True)

    def successor(self, repeats: int = 1) -> Sequences:
        """Every start symbol ``a`` followed by ``a+1, a+2, a+3`` (mod ``symbols``)."""
        s, s0 = self.spec.symbols, self.vocab.symbol0
        rows = [[BOS, SUCC, *(s0 + (a + i) % s for i in range(4)), EOS] for a in range(s)] * repeats
        return _sequences(rows, [[3, 4, 5]] * len(rows), answer_only=True)

    def describe(self, seed: bool = True) -> str:
        spec = self.spec
        return (f"facts: {spec.persons} persons x {spec.relations} relations x {TEMPLATES} templates "
                f"(forget {spec.forget}, validation {spec.validation}, unseen {spec.unseen}, "
                f"retain {len(self.splits['retain'])}); copy {spec.copy_train}/{spec.copy_test}, "
                f"successor {spec.symbols}; vocabulary {self.vocab.size}" + (f"; seed {self.seed}" if seed else ""))


def _distinct_tuples(count: int, symbols: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct random 4-tuples over ``symbols`` (train and test never share one)."""
    if count > symbols ** 4 or symbols ** 4 > 1 << 22:
        raise ValueError(f"FactsSpec: {count} copy tuples over {symbols} symbols: need count <= symbols^4 "
                         "and symbols <= 45")
    codes = torch.randperm(symbols ** 4, generator=generator)[:count]
    return torch.stack([codes // symbols ** i % symbols for i in range(4)], 1)
