"""Run folders and their life, for every front end (``cli.py``, ``batch/``, and the nodes where it fits):

- ``life.py``: open a new or resumed run, train it, with the prior loaded once for many runs in a batch;
- ``outputs.py``: what a run writes besides checkpoints (previews, the ring of views, the mesh);
- ``folders.py``: output folders checked before anything slow, which run ``--resume PATH`` means;
- ``flags.py``: a run's configuration from command-line flags, and what ``--resume`` may change;
- ``stopping.py``: Ctrl-C and SIGTERM as a clean stop at a safe point;
- ``progress.py``: progress bars and warning lines on the terminal.

Nothing is imported here; each module imports torch and the engine on use, so ``--help`` stays fast.
"""
