"""weightkit.linalg: sign fixing of singular vectors, against a plain loop."""

import torch

from weightkit.linalg import largest_entry_signs


def test_signs_of_the_largest_entry_along_either_dimension():
    torch.manual_seed(0)
    m = torch.randn(5, 7)
    m[:, 2] = 0  # a zero vector gets +1
    for dim in (0, 1):
        vectors = m.T if dim == 0 else m  # rows of `vectors` are the vectors
        expected = []
        for v in vectors:
            top = max(range(len(v)), key=lambda i: abs(float(v[i])))
            expected.append(-1.0 if float(v[top]) < 0 else 1.0)
        assert largest_entry_signs(m, dim=dim).tolist() == expected


def test_flipping_makes_the_svd_factors_unique():
    torch.manual_seed(1)
    m = torch.randn(6, 4)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    signs = largest_entry_signs(u, dim=0)
    u1, vh1 = u * signs, vh * signs[:, None]
    u2, vh2 = -u * largest_entry_signs(-u, dim=0), -vh * largest_entry_signs(-u, dim=0)[:, None]
    assert torch.allclose(u1, u2) and torch.allclose(vh1, vh2)
    assert torch.allclose(u1 @ torch.diag(s) @ vh1, m, atol=1e-5)
    assert (u1.abs().argmax(0) == u1.argmax(0)).all()  # the largest entry of every column is positive
