"""The main job: LPC (Jeffreys warm start, preconditioning) on real Fashion-MNIST.

Reads the IDX files of Debian's ``dataset-fashion-mnist`` package; nothing
downloads. Defaults are sized to finish in under 20 minutes on a 2-core CPU
(T = 10 Langevin steps, 2 epochs = 1,874 SGD steps: about 12 minutes):

    python -m experiments.fashion_mnist
    python -m experiments.fashion_mnist --algorithm=vae     # same networks, VAE objective
"""

from experiments import launch

DEFAULTS = dict(
    dataset="fashion_mnist",
    algorithm="lpc",
    warm_start="jeffreys",
    preconditioner=True,
    step_size=0.1,
    decay=0.99,
    num_steps=10,
    num_epochs=2.0,
    log_every=25,
    checkpoint_every=250,
    fd_every=250,
)

if __name__ == "__main__":
    launch.run(**DEFAULTS)
