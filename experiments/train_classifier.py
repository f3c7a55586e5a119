"""Trains the feature classifier behind ``fd_fmnist`` and writes its asset files.

    python -m experiments.train_classifier --dataset=fashion_mnist --seed=0 --num_epochs=6

Trains :class:`lpc_jax.evaluation.classifier.CNN` with Adam (cosine-decayed learning rate)
on the training split read by :func:`lpc_jax.data.sources.load_idx`, evaluates top-1
accuracy on the test split, and writes ``lpc_jax/assets/<prefix>.msgpack`` and
``<prefix>.json`` (test accuracy, seed, epochs, ...). Everything is seeded, so a
rerun on the same machine gives the same weights (up to XLA CPU nondeterminism).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from lpc_jax.data import pipeline, sources
from lpc_jax.evaluation import classifier

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "fashion_mnist", sorted(classifier.PRETRAINED), "Dataset to train on.")
flags.DEFINE_string("data_dir", None, "Directory of the *-ubyte.gz IDX files (default: Debian's "
                    "Fashion-MNIST; required for mnist).")
flags.DEFINE_integer("seed", 0, "Seed for initialisation and batch order.")
flags.DEFINE_integer("num_epochs", 6, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak Adam learning rate (cosine-decayed to 0).")
flags.DEFINE_bool("write_assets", True, "Write the weights and metadata into lpc_jax/assets/.")


def cross_entropy(params, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy (nats) of a batch: images (B, 28, 28, 1), labels (B,) int."""
    logits, _ = classifier.CNN().apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(optimizer: optax.GradientTransformation):
    """Returns a jitted ``(params, opt_state, images, labels) -> (params, opt_state, loss)``."""

    @jax.jit
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(cross_entropy)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def main(argv):
    del argv
    if FLAGS.dataset == "mnist" and FLAGS.data_dir is None:
        raise app.UsageError("--dataset=mnist needs --data_dir=DIR with the MNIST *-ubyte.gz files")
    train = sources.load_idx("train", FLAGS.data_dir)
    test = sources.load_idx("test", FLAGS.data_dir)
    steps_per_epoch = train.images.shape[0] // FLAGS.batch_size
    schedule = optax.cosine_decay_schedule(FLAGS.learning_rate, FLAGS.num_epochs * steps_per_epoch)
    optimizer = optax.adam(schedule)
    params = classifier.init_params(jax.random.key(FLAGS.seed))
    opt_state = optimizer.init(params)
    step = make_train_step(optimizer)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    logging.info("training %s classifier: %d params, %d steps/epoch", FLAGS.dataset, num_params, steps_per_epoch)

    start = time.time()
    for epoch in range(FLAGS.num_epochs):
        t0 = time.time()
        losses = []
        order = pipeline.epoch_order(train.images.shape[0], FLAGS.seed, epoch)  # the order of pipeline.batches
        for i in range(steps_per_epoch):
            idx = order[i * FLAGS.batch_size : (i + 1) * FLAGS.batch_size]
            images, labels = sources.to_float(train.images[idx]), train.labels[idx]
            params, opt_state, loss = step(params, opt_state, jnp.asarray(images), jnp.asarray(labels))
            losses.append(loss)
        test_acc = classifier.accuracy(params, test.images, test.labels)
        print(f"epoch {epoch + 1}: train loss {float(jnp.mean(jnp.stack(losses))):.4f} "
              f"test acc {test_acc:.4f} ({time.time() - t0:.0f} s)", flush=True)

    train_acc = classifier.accuracy(params, train.images, train.labels)
    test_acc = classifier.accuracy(params, test.images, test.labels)
    info = {
        "dataset": FLAGS.dataset,
        "test_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4),
        "num_test_images": int(test.images.shape[0]),
        "seed": FLAGS.seed,
        "num_epochs": FLAGS.num_epochs,
        "batch_size": FLAGS.batch_size,
        "learning_rate": FLAGS.learning_rate,
        "optimizer": "adam, cosine decay to 0",
        "num_params": num_params,
        "train_seconds": round(time.time() - start, 1),
        "jax_version": jax.__version__,
    }
    print(f"final: train acc {train_acc:.4f}, test acc {test_acc:.4f}", flush=True)
    if FLAGS.write_assets:
        paths = classifier.save_pretrained(params, info, FLAGS.dataset)
        print("wrote", *paths, flush=True)


if __name__ == "__main__":
    app.run(main)
