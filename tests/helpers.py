"""Small assertions shared by the tests."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree


def assert_close_to_eager(actual, expected, rel: float = 1e-4) -> None:
    """Same structure, and every tensor within ``rel`` of the output's scale (max abs of the reference)."""
    a_flat, a_spec = pytree.tree_flatten(actual)
    e_flat, e_spec = pytree.tree_flatten(expected)
    assert a_spec == e_spec, f"structure differs: {a_spec} vs {e_spec}"
    for a, e in zip(a_flat, e_flat):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor)
            assert a.shape == e.shape and a.dtype == e.dtype
            scale = max(e.detach().abs().max().item(), 1e-6) if e.numel() else 1.0
            err = (a.detach() - e.detach()).abs().max().item() if e.numel() else 0.0
            assert err <= rel * scale, f"max abs error {err} above {rel} x scale {scale}"
        else:
            assert a == e


def swap_link_during(link, during, after, fn):
    """``fn`` wrapped so that the symlink ``link`` points at ``during`` while ``fn`` runs and at ``after``
    before and after: a path an attacker swaps between two checks, made deterministic."""
    def wrapped(*args, **kwargs):
        link.unlink()
        link.symlink_to(during)
        try:
            return fn(*args, **kwargs)
        finally:
            link.unlink()
            link.symlink_to(after)
    return wrapped


def assert_facts(message: str, *facts: str) -> None:
    """Every one of ``facts`` (what, where, expected, actual, what to do) appears in ``message``: a test of an
    error's content that survives rewording and fails when a fact goes missing."""
    missing = [f for f in facts if f not in message]
    assert not missing, f"missing {missing} in: {message}"
