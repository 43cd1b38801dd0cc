import torch

from rsae.data.synthetic import SyntheticDataModule, _Stream


def test_stream_is_deterministic_and_resumes_at_a_batch_index():
    dm = SyntheticDataModule(d_in=8, n_features=32, batch_size=16, seed=3)
    first = [b for _, b in zip(range(5), _Stream(dm.source, 16, 0, None))]
    again = [b for _, b in zip(range(5), _Stream(dm.source, 16, 0, None))]
    resumed = [b for _, b in zip(range(2), _Stream(dm.source, 16, 3, None))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(resumed[0], first[3]) and torch.equal(resumed[1], first[4])


def test_ranks_get_disjoint_batches_that_interleave_the_single_rank_stream():
    dm = SyntheticDataModule(d_in=8, n_features=32, batch_size=16, seed=3)
    single = [b for _, b in zip(range(6), _Stream(dm.source, 16, 0, None))]
    r0 = [b for _, b in zip(range(3), _Stream(dm.source, 16, 0, None, rank=0, world=2))]
    r1 = [b for _, b in zip(range(3), _Stream(dm.source, 16, 0, None, rank=1, world=2))]
    assert all(torch.equal(a, b) for a, b in zip(r0, single[0::2]))
    assert all(torch.equal(a, b) for a, b in zip(r1, single[1::2]))


def test_superposition_statistics_and_normalisation():
    dm = SyntheticDataModule(d_in=16, n_features=64, mean_active=5.0, batch_size=4096, seed=0)
    dm.setup()
    assert dm.ground_truth.shape == (64, 16)
    torch.testing.assert_close(dm.ground_truth.norm(dim=1), torch.ones(64))
    assert abs(float(dm.source.probs.sum()) - 5.0) < 1e-3
    assert dm.source.probs[0] > dm.source.probs[-1]  # power law: early features fire more
    x = dm.source.batch(0, 4096) * dm.norm_scale
    assert abs(float(x.norm(dim=-1).mean()) - 16**0.5) < 0.2
