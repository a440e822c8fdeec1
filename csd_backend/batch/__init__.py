"""``python -m csd_backend batch``: many prompts, one run folder each, on every local device or a Ray cluster.

- ``prompts_file``: the PROMPTS file (text or JSONL), checked line by line before anything runs;
- ``plan``: one ``RunSpec`` per run (prompt × seed) with its run folder and resolved config, saved as
  ``batch.json``;
- ``manifest``: ``manifest.jsonl``, appended atomically as runs start and end;
- ``execute``: one run inside a worker (the prior loaded once per worker; new, resumed or already finished);
- ``local``: worker processes, one per device; ``ray_runner``: one Ray task per run (``pip install ".[ray]"``);
- ``driver``: the command itself (events → manifest, progress, summary, exit code).
"""
