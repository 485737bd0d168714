"""The CamVid click-supervision study, split by concern; its command line is
benchmarks/camvid_study.py (`python -m benchmarks.camvid_study --help`)."""
