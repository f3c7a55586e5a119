"""SVHN (cropped digits) with the paper's best LPC setting (step 1e-3, no preconditioning).

    python -m experiments.svhn [--data_dir=DIR]   # DIR/train_32x32.mat + test_32x32.mat, or TFDS svhn_cropped
"""

from experiments import launch

DEFAULTS = dict(dataset="svhn", step_size=1e-3, preconditioner=False, num_epochs=15.0)

if __name__ == "__main__":
    launch.run(**DEFAULTS)
