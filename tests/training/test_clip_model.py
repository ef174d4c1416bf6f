"""CLIP for training: the optimizer's parameter groups."""

import pytest
import torch

from training.models.clip import create_clip, param_groups


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_clip("clip-tiny")


def test_param_groups_exclude_gains_biases_and_temperature(tiny):
    decay, no_decay = param_groups(tiny.model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert id(tiny.model.logit_scale) in ids(no_decay)
    assert ids(decay).isdisjoint(ids(no_decay))
    assert ids(decay) | ids(no_decay) == {id(p) for p in tiny.model.parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
