"""What keeps a run whole: atomic files, content keys, the stage cache, checkpoints, the run lock, output
guards, and the judges' bounded HTTP client. Imports no project file; the method never needs to be read through it."""
