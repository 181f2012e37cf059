import torch

from eapo_ray.algo.advantages import group_advantages


def test_std_matches_reference():
    torch.manual_seed(0)
    r = torch.rand(5, 8)
    adv = group_advantages(r)
    for i in range(5):
        row = r[i]
        ref = (row - row.mean()) / (row.std(unbiased=True) + 1e-6)
        assert torch.allclose(adv[i], ref, atol=1e-6)


def test_none_scale_and_constant_rows():
    r = torch.tensor([[1.0, 0.0, 0.1, 1.0], [0.1, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0]])
    a = group_advantages(r, scale="none")
    assert torch.allclose(a[0], r[0] - r[0].mean())
    assert torch.equal(a[1], torch.zeros(4)) and torch.equal(a[2], torch.zeros(4))
    assert torch.equal(group_advantages(r)[1], torch.zeros(4))


def test_binary_group_values():
    a = group_advantages(torch.tensor([[1.0, 0.0]]))
    std = torch.tensor([1.0, 0.0]).std()
    assert torch.allclose(a, torch.tensor([[0.5, -0.5]]) / (std + 1e-6))
