"""The world the method runs in: the synthetic radiographs and tiny bases, the real datasets and released
files, the offline rule judge, metrics and pictures, and train.py's other flags."""
