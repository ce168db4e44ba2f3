"""Data-parallel training of the deformable digits model on every available device.

The batch is sharded across a 1-D device Mesh with NamedSharding and the
parameters are replicated; jax.jit inserts the gradient all-reduce. The same
script runs on one CPU, on several GPUs of one host, and on several hosts
(processes), each feeding its own slice of the global batch.

    python examples/data_parallel.py --devices 4     # fake 4 CPU devices
    python examples/data_parallel.py                  # whatever devices exist
    # two processes (here on one machine, 2 fake CPU devices each):
    python examples/data_parallel.py --devices 2 --coordinator 127.0.0.1:12355 \
        --num-processes 2 --process-id 0 &
    python examples/data_parallel.py --devices 2 --coordinator 127.0.0.1:12355 \
        --num-processes 2 --process-id 1

Instead of the flags, JAX's own environment works too: JAX_COORDINATOR_ADDRESS,
with the process count and id from a cluster JAX detects (SLURM, Open MPI, ...).
Only process 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=None,
                        help="fake this many CPU devices (sets XLA_FLAGS before jax starts)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small data set")
    parser.add_argument("--coordinator", default=None,
                        help="HOST:PORT of process 0, to train across several processes")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--out", default=None,
                        help="write the trained parameters to DIR/params_process<I>.npz")
    return parser.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    if opts.devices:
        # Must happen before jax is imported (deformable_digits imports it).
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={opts.devices}"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if opts.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # collectives between CPU processes (no effect on GPU / TPU devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(opts.coordinator, opts.num_processes, opts.process_id)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from deformable_digits import DEFORM_WIDTHS, DigitNet, make_data, train_step

    def say(*args, **kwargs):
        if jax.process_index() == 0:
            print(*args, **kwargs, flush=True)

    devices = jax.devices()  # every process's: the mesh spans all of them
    processes = jax.process_count()
    if opts.batch_size % len(devices):
        raise SystemExit(f"--batch-size {opts.batch_size} must divide over {len(devices)} devices")
    mesh = Mesh(np.array(devices), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    say(f"{len(devices)} devices ({devices[0].platform}) in {processes} process(es); global "
        f"batch {opts.batch_size}, {opts.batch_size // len(devices)} per device")

    x_train, y_train, _, _ = make_data(opts.seed, train_copies=1, limit=600 if opts.quick else None)
    model = DigitNet(DEFORM_WIDTHS, deformable=True)
    params = model.init(jax.random.key(opts.seed), x_train[:1])["params"]
    tx = optax.adam(2e-3)
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)

    # Inputs sharded over the mesh make jit partition the step and all-reduce the gradients.
    step = jax.jit(train_step(model, tx))

    # Every process draws the same global batch and feeds its own slice of it
    # (the slice for its own devices, in mesh order).
    rng = np.random.default_rng(opts.seed)
    local = opts.batch_size // processes
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    for i in range(opts.steps):
        idx = rng.choice(len(x_train), opts.batch_size, replace=False)
        x = jax.make_array_from_process_local_data(sharded, x_train[idx][mine])
        y = jax.make_array_from_process_local_data(sharded, y_train[idx][mine])
        params, opt_state, loss = step(params, opt_state, x, y)
        say(f"step {i + 1:4d}  loss {float(loss):.4f}")
    say("parameter sharding:", jax.tree_util.tree_leaves(params)[0].sharding)
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        leaves = jax.tree_util.tree_leaves_with_path(params)
        path = os.path.join(opts.out, f"params_process{jax.process_index()}.npz")
        np.savez(path, **{jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
                                      for path, leaf in leaves})


if __name__ == "__main__":
    main()
