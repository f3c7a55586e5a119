"""CIFAR-10 with the paper's best LPC setting (step 0.1, decay 0.25)."""

from experiments import launch

DEFAULTS = dict(dataset="cifar10", step_size=0.1, decay=0.25, preconditioner=True, num_epochs=15.0)

if __name__ == "__main__":
    launch.run(**DEFAULTS)
