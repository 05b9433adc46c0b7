"""Helpers shared by the permutation tests (tests/merge/test_rebasin.py and test_align.py)."""

import torch


def shapes_of(model):
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def assert_states_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def loaded_copy(model, state):
    """A model of ``model``'s class and config holding ``state``."""
    copy = type(model)(model.config).eval()
    copy.load_state_dict(state)
    return copy


def take_rows(tensor, index, block):
    """Plain reference: blocks of ``block`` rows, block i of the result = block index[i] of the input."""
    return torch.cat([tensor[int(j) * block : (int(j) + 1) * block] for j in index])


def random_perms(spec, seed):
    """A random permutation for every permutation of the spec, none of them the identity."""
    gen = torch.Generator().manual_seed(seed)
    perms = {}
    for name, size in spec.sizes.items():
        index = torch.randperm(size, generator=gen)
        while size > 1 and torch.equal(index, torch.arange(size)):
            index = torch.randperm(size, generator=gen)
        perms[name] = index
    return perms
