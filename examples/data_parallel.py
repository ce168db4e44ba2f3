"""Data-parallel training of the deformable digits model on every available device.

The batch is sharded across a 1-D device Mesh with NamedSharding and the
parameters are replicated; jax.jit inserts the gradient all-reduce. The same
script runs on one CPU, on several GPUs of one host, and (after
jax.distributed.initialize(), see the README) on several hosts.

    python examples/data_parallel.py --devices 4     # fake 4 CPU devices
    python examples/data_parallel.py                  # whatever devices exist
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

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from deformable_digits import DEFORM_WIDTHS, DigitNet, make_data, train_step

    devices = jax.devices()
    if opts.batch_size % len(devices):
        raise SystemExit(f"--batch-size {opts.batch_size} must divide over {len(devices)} devices")
    mesh = Mesh(np.array(devices), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    print(f"{len(devices)} devices ({devices[0].platform}); global batch {opts.batch_size}, "
          f"{opts.batch_size // len(devices)} per device")

    x_train, y_train, _, _ = make_data(opts.seed, train_copies=1, limit=600 if opts.quick else None)
    model = DigitNet(DEFORM_WIDTHS, deformable=True)
    params = model.init(jax.random.key(opts.seed), x_train[:1])["params"]
    tx = optax.adam(2e-3)
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)

    # Inputs sharded over the mesh make jit partition the step and all-reduce the gradients.
    step = jax.jit(train_step(model, tx))

    rng = np.random.default_rng(opts.seed)
    for i in range(opts.steps):
        idx = rng.choice(len(x_train), opts.batch_size, replace=False)
        x = jax.device_put(x_train[idx], sharded)
        y = jax.device_put(y_train[idx], sharded)
        params, opt_state, loss = step(params, opt_state, x, y)
        print(f"step {i + 1:4d}  loss {float(loss):.4f}", flush=True)
    print("parameter sharding:", jax.tree_util.tree_leaves(params)[0].sharding)


if __name__ == "__main__":
    main()
