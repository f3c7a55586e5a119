"""MNIST through TFDS (prepared data), the Fashion-MNIST launcher's defaults.

No MNIST classifier is shipped, so the in-training FD monitor is off.
"""

from experiments import fashion_mnist, launch

if __name__ == "__main__":
    launch.run(**{**fashion_mnist.DEFAULTS, "dataset": "mnist", "fd_every": 0})
