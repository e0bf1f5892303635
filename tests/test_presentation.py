"""Galleries and the history table follow the levels: the first level is the primary one, whatever its name."""

import torch

import relict_callbacks as rc

SIZE = 16


def copier_check(levels):
    """A monitor over ``levels`` and one check of a "generator" that returns noisy training images with their masks
    (so the levels disagree: Dice 1, NCC below 1)."""
    train = rc.data.make_phantoms(8, ndim=2, size=SIZE, seed=0)
    noise = torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    images = torch.stack([torch.as_tensor(item["image"]) for item in train]) + noise
    labels = torch.stack([torch.as_tensor(item["label"]) for item in train])
    monitor = rc.Monitor(levels=levels, train_items=train, num_samples=4, alpha=0.2, progress=False,
                         sampler=lambda model, n, generator: (images[:n], labels[:n]))
    monitor.prepare()
    return monitor, monitor.check(None, epoch=0, step=1)


def test_the_first_level_orders_and_shows_the_gallery_and_fills_the_table():
    monitor, check = copier_check([rc.SegmentationLevel(grid=SIZE), rc.VoxelLevel(grid=8)])
    rows = monitor.gallery(check)
    assert len(rows) == 4 and all(row.nearest is not None for row in rows)
    # shown by the segmentation level: the voxel level's stored image brought to the sample's 16x16, not 8x8
    assert all(row.sample.shape == row.nearest.shape == (1, SIZE, SIZE) for row in rows)
    assert rows[0].caption.split("  ")[1].startswith("Dice")
    table = monitor.history_table().splitlines()
    entry = monitor.history[0]
    assert entry["relict/segmentation/nn_similarity_mean"] == 1.0 > entry["relict/voxel/nn_similarity_mean"]
    assert table[1].split()[5] == "1.000"  # epoch, loss, samples, replica rate, bounds, mean similarity (primary level)


def test_voxel_first_shows_both_on_its_grid():
    monitor, check = copier_check([rc.VoxelLevel(grid=8), rc.SegmentationLevel(grid=SIZE)])
    rows = monitor.gallery(check)
    assert all(row.sample.shape == row.nearest.shape == (1, 8, 8) for row in rows)
    assert rows[0].caption.split("  ")[1].startswith("NCC")
