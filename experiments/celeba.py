"""CelebA 64x64 with the paper's best LPC setting (step 0.1, decay 0.25).

    python -m experiments.celeba --step_size=0.1                    # finds the data (README: Datasets)
    python -m experiments.celeba --data_dir=DIR --data_cache=auto   # DIR/celeba/img_align_celeba[.zip], decoded once

Reads CelebA's JPEGs (folder or zip, torchvision or Kaggle layout) or a TFDS-prepared
celeb_a from --data_dir, $LPC_JAX_DATA_DIR, $TFDS_DATA_DIR, ~/tensorflow_datasets,
./data or ~/data (lpc_jax/data/discover.py).
"""

from experiments import launch

DEFAULTS = dict(dataset="celeba", step_size=0.1, decay=0.25, preconditioner=True, num_epochs=15.0)

if __name__ == "__main__":
    launch.run(**DEFAULTS)
