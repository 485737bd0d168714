"""Where the benchmarks find the raw CamVid split (the project's real images:
../shared/datasets/camvid beside the repository, as configs/camvid_clicks.py
reads it) and its class count."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMVID_TRAIN = os.path.normpath(os.path.join(
    REPO_ROOT, '..', 'shared', 'datasets', 'camvid', 'train'))
# Label value 11 is void; 0..10 are the classes.
CAMVID_CLASSES = 11
