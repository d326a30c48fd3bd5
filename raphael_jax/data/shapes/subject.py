"""The fine-tuning subject: a few fixed images of one kind in a narrow set of contexts (paper App. 7.8).

``data.kind = "subject"`` trains on ``data.subject.num_images`` single-object scenes whose kind is
``data.subject.kind`` (by default the ring, a kind the base world never draws: ``world.NEW_KINDS``) with
colours, sizes and places drawn from the config's short lists, each rendered once with its jitter and
then repeated, reshuffled every epoch. :func:`unseen_prompts` draws the evaluation prompts of the
measurement: the subject in colours and places it was never trained in (docs/FINETUNE.md).

The base tokenizer cannot spell a new kind's name: it encodes as ``<unk>``, a token the base run never
saw, which so plays the part of DreamBooth's rare identifier word.
"""
from __future__ import annotations

import numpy as np

from raphael_jax.data.shapes.world import COLOURS, PLACES, SIZES, ShapeObject, check_image_size, make_caption, render

SUBJECT_STREAM = 7  # RNG stream of the subject's scenes (the world uses 0 for training, 1 for evaluation)


def subject_objects(subject, seed: int) -> list[ShapeObject]:
    """The ``subject.num_images`` objects of the fine-tuning set (deterministic in ``seed``)."""
    rng = np.random.default_rng([int(seed), SUBJECT_STREAM])
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return [ShapeObject(colour=pick(subject.colours), kind=subject.kind, size=pick(subject.sizes),
                        place=pick(subject.places)) for _ in range(subject.num_images)]


class SubjectSource:
    """Random-access grain source: item i is image ``perm_e[i % n]`` of epoch ``e = i // n`` ({image, caption})."""

    def __init__(self, subject, seed: int, image_size: int, size: int = 2**40):
        self.image_size = check_image_size(image_size)
        self.seed, self.size = int(seed), int(size)
        self.objects = subject_objects(subject, seed)
        self.images = [render([o], self.image_size, np.random.default_rng([self.seed, i, SUBJECT_STREAM]))
                       for i, o in enumerate(self.objects)]
        self.captions = [make_caption([o]) for o in self.objects]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index) -> dict:
        i = int(index)
        n = len(self.objects)
        epoch, j = divmod(i, n)
        k = int(np.random.default_rng([self.seed, epoch, SUBJECT_STREAM + 1]).permutation(n)[j])
        return {"image": self.images[k], "caption": self.captions[k]}

    def __repr__(self) -> str:
        return f"SubjectSource({len(self.objects)} images of {self.objects[0].kind}, seed={self.seed})"


def unseen_prompts(subject, n: int, seed: int) -> list[list[ShapeObject]]:
    """``n`` one-object prompts of the subject's kind, each in a colour and a place outside the training ones
    (sizes from all sizes: those outside ``subject.sizes`` are unseen too)."""
    colours = [c for c in COLOURS if c not in subject.colours]
    places = [p for p in PLACES if p not in subject.places]
    if not colours or not places:
        raise ValueError("the subject was trained in every colour or every place: no unseen context is left")
    rng = np.random.default_rng([int(seed), SUBJECT_STREAM + 2])
    return [[ShapeObject(colour=colours[int(rng.integers(len(colours)))], kind=subject.kind,
                         size=SIZES[int(rng.integers(len(SIZES)))], place=places[int(rng.integers(len(places)))])]
            for _ in range(n)]
