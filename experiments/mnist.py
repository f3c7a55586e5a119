"""MNIST through TFDS (prepared data), same defaults as the Fashion-MNIST launcher."""

from experiments import fashion_mnist, launch

if __name__ == "__main__":
    launch.run(**{**fashion_mnist.DEFAULTS, "dataset": "mnist"})
