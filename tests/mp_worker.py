"""One process of tests/test_multiprocess.py: a short run of the train loop, its history dumped as JSON.

    python tests/mp_worker.py --workdir W --out O [--coordinator 127.0.0.1:PORT --num_processes 2
                              --process_id I] [--fault same_shard|no_allreduce]

Process 0 writes O/history.json (every step's loss) and O/params.npz (the raw params).
Faults, to show the comparison can fail: 'same_shard' makes every process read the first
data shard; 'no_allreduce' is what a broken all-reduce amounts to: the process trains on
its own share of the global batch alone (no jax.distributed, so it needs no partner;
Orbax refuses to save host-local arrays in a multi-process run, so the fault cannot be
made by a process-local mesh inside one).
"""

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from rectflow_jax import configlib, parallel, train
from rectflow_jax.data import datasets
from rectflow_jax.models import MLPVelocity

NUM_STEPS = 12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--coordinator")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--fault", choices=("same_shard", "no_allreduce"))
    args = parser.parse_args()
    alone = args.fault == "no_allreduce"
    if not alone:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    config = configlib.base_config()
    config.model = dict(name="mlp", hidden=32, depth=2, time_embed_dim=16)
    config.optim.update(lr=1e-2, warmup_steps=0)  # no warm-up: every step moves the params
    config.train.update(batch_size=16 // (args.num_processes if alone else 1), num_steps=NUM_STEPS, log_every=1,
                        checkpoint_every=NUM_STEPS)
    # A fixed set of points walked in per-epoch permutations: the shards of one step
    # together are the batch a single process reads.
    points = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32) * 0.5 + 2.0
    data = datasets.ArrayDataset("points", (2,), 0, images=points, labels=np.zeros(40, np.int32))
    batches = data.batches
    if args.fault == "same_shard":
        batches = lambda size, seed, start, shard: data.batches(size, seed, start, shard=(0, shard[1]))
    elif alone:
        batches = lambda size, seed, start, shard: data.batches(size, seed, start,
                                                                shard=(args.process_id, args.num_processes))
    stage = train.Stage(name="mp", objective="flow", model=MLPVelocity(hidden=32, depth=2, time_embed_dim=16),
                        shape=(2,), num_classes=0, source_fn=data.sample_source, batches=batches)
    result = train.train(config, args.workdir, stage, mesh=parallel.make_mesh({"data": -1}), progress=False)

    if jax.process_index() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.json").write_text(json.dumps([{"step": h["step"], "loss": h["loss"]}
                                                      for h in result.history]))
        params = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))  # replicated params
                  for path, leaf in jax.tree_util.tree_leaves_with_path(result.state.params)}
        np.savez(out / "params.npz", **params)


if __name__ == "__main__":
    main()
