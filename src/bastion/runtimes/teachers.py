"""A teacher ensemble for private prediction (PATE): each teacher saw a disjoint part of the data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bastion.runtimes import ModelRuntime


class TeacherEnsemble:
    def __init__(self, teachers: Sequence[ModelRuntime], n_classes: int) -> None:
        self.teachers = list(teachers)
        self.n_classes = n_classes

    def votes(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Vote counts, shape (rows, classes): how many teachers chose each class."""
        rows = next(iter(inputs.values())).shape[0]
        counts = np.zeros((rows, self.n_classes), dtype=np.float64)
        for teacher in self.teachers:
            choice = np.argmax(teacher.predict(inputs), axis=1)
            counts[np.arange(rows), choice] += 1
        return counts
