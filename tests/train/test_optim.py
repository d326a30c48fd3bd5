"""Learning-rate schedules of the train step (warm-up, then constant or cosine decay)."""
import math
import os

import numpy as np
import pytest

from raphael_jax.config import load_config
from raphael_jax.train.state import learning_rate, lr_schedule

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.py")


def _config(kind, final=0.0):
    return load_config(CONFIG, [f"train.lr_schedule={kind!r}", "train.learning_rate=0.002",
                                           "train.warmup_steps=200", "train.num_steps=2400",
                                           f"train.lr_final_fraction={final}"])


def test_constant_schedule_after_warmup():
    c = _config("constant")
    lrs = np.array([float(learning_rate(c, s)) for s in (0, 100, 200, 1000, 2400)])
    np.testing.assert_allclose(lrs, [0.0, 0.001, 0.002, 0.002, 0.002], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_cosine_schedule_matches_formula(final):
    c = _config("cosine", final)
    sched = lr_schedule(c)
    for step in (0, 50, 200, 700, 1300, 2399, 2400):
        if step < 200:
            want = 0.002 * step / 200
        else:
            frac = (step - 200) / 2200
            want = 0.002 * ((1 - final) * 0.5 * (1 + math.cos(math.pi * frac)) + final)
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
    assert float(sched(2400)) == pytest.approx(0.002 * final, abs=1e-9)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="train.lr_schedule"):
        lr_schedule(_config("linear"))
