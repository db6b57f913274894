"""Each source of randomness has its own stream: a trial's seed fixes its labeled subset, and with its replicate
every stream of training noise (initial weights, batch order, augmentation, the step's draws), none of which
coincides with another's; the A/A row replicates the noise on Baseline's labels."""

import torch

from segsde.runtime import batch_indices, stream_seed
from segsde.trainer.data import TrialBatches, labeled_ids, mix_pool
from segsde.trainer.model import build_network
from segsde.trainer.run import train_config


def test_streams_differ_by_purpose_and_key_and_never_shift_into_each_other():
    seeds = {stream_seed(purpose, seed, replicate, 0, step) for purpose in ("trainer/augment", "trainer/step")
             for seed in range(3) for replicate in range(2) for step in range(50)}
    assert len(seeds) == 2 * 3 * 2 * 50 and all(0 <= s < 2**63 for s in seeds)
    # the arithmetic seeds these replace let one purpose's step s + 1 equal another's step s
    assert stream_seed("trainer/step", 0, 0, 0, 5) != stream_seed("trainer/augment", 0, 0, 0, 6)
    assert stream_seed("trainer/step", 0, 0, 0, 5) == stream_seed("trainer/step", 0, 0, 0, 5)  # a resumed run draws the same
    assert batch_indices(10, 3, 2, 0, 1, stream_seed("trainer/labeled", 0, 0)) != batch_indices(10, 3, 2, 0, 1, stream_seed("trainer/pool", 0, 0))


def test_the_aa_row_keeps_baselines_labels_and_draws_its_own_training_noise(synth_root):
    base, aa = (train_config("smoke", row, {"budget": 8, "seed": 2}) for row in ("baseline", "baseline_aa"))
    assert aa.replicate == 1 and base.replicate == 0
    labeled = labeled_ids(synth_root, base)
    assert labeled_ids(synth_root, aa) == labeled  # the same labeled subset

    def batches(cfg):
        items = TrialBatches(synth_root, cfg, labeled, None, 0, 0, 1)
        return [items[k]["labeled"]["image"] for k in range(3)]

    assert all(torch.equal(a, b) for a, b in zip(batches(base), batches(base)))  # reproducible
    assert not any(torch.equal(a, b) for a, b in zip(batches(base), batches(aa)))  # other order, crops and flips

    def initial_weights(cfg):
        torch.manual_seed(stream_seed("trainer/init", cfg.seed, cfg.replicate))
        return build_network(cfg).head.classify.weight

    assert not torch.equal(initial_weights(base), initial_weights(aa))
    teacher = train_config("smoke", "pseudolabel", {"budget": 8, "seed": 2})
    assert mix_pool(synth_root, teacher, labeled) == mix_pool(synth_root, train_config("smoke", "pseudolabel", {"budget": 8, "seed": 2,
                                                                                                              "replicate": 1}), labeled)
