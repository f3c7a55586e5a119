"""CelebA 64x64 with the paper's best LPC setting (step 0.1, decay 0.25).

    python -m experiments.celeba --data_dir=DIR     # TFDS celeb_a prepared in DIR
"""

from experiments import launch

DEFAULTS = dict(dataset="celeba", step_size=0.1, decay=0.25, preconditioner=True, num_epochs=15.0)

if __name__ == "__main__":
    launch.run(**DEFAULTS)
