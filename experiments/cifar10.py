"""CIFAR-10 with the paper's best LPC setting (step 0.1, decay 0.25).

    python -m experiments.cifar10 [--data_dir=DIR]   # DIR/cifar-10-batches-py/ (the python version) or TFDS cifar10
"""

from experiments import launch

DEFAULTS = dict(dataset="cifar10", step_size=0.1, decay=0.25, preconditioner=True, num_epochs=15.0)

if __name__ == "__main__":
    launch.run(**DEFAULTS)
