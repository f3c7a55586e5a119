"""MNIST through TFDS (prepared data), the Fashion-MNIST launcher's defaults.

No MNIST classifier is shipped, so the FD monitor and the final sample metrics are off.
"""

from experiments import fashion_mnist, launch

if __name__ == "__main__":
    launch.run(**{**fashion_mnist.DEFAULTS, "dataset": "mnist", "fd_every": 0, "eval_samples": 0})
