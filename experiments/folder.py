"""Your own images: any folder of JPEG/PNG files, centre-cropped and resized, with CelebA's best LPC setting.

    python -m experiments.folder --data_dir=DIR [--image_size=32] [--data_cache=auto]

Every .jpg/.jpeg/.png under DIR (recursively) is an example; 10% are held out for
the test ELBO by a hash of the file name (lpc_jax/data/folder.py).
"""

from experiments import launch

DEFAULTS = dict(dataset="folder", image_size=64, step_size=0.1, decay=0.25, preconditioner=True, num_epochs=15.0)

if __name__ == "__main__":
    launch.run(**DEFAULTS)
