"""``convlock bench``: lock and server performance as ratios against baselines measured in the same run.

Design: these machines are noisy, so no figure stands alone. Every figure
is measured next to a baseline (``asyncio.Lock``, two ``PING`` round trips,
raw ``EVALSHA``, redis-py's ``Lock``, ``python-redis-lock``, a bare ASGI
echo, Rasa's own lock stores) in the same run, in short interleaved blocks,
and reported as a ratio (see ``shared/notes/measuring.md``).

Modules, one job each: :mod:`.measure` (pure statistics and CPU pinning),
:mod:`.report` (figures, results.json and results.md), :mod:`.procs`
(redis-server, ``convlock run`` replicas and bench worker processes),
:mod:`.worker` (the child process that contends from another process),
:mod:`.http` (a minimal keep-alive HTTP client), :mod:`.echo` (the bare echo
app), :mod:`.scenarios` (one module per family of scenarios),
:mod:`.plots` (PNG plots, matplotlib from the ``bench`` extra) and
:mod:`.cli` (the ``convlock bench`` command).

A baseline library that is not installed (``python-redis-lock``, Rasa) is
reported as a skipped comparison with its reason, never replaced by
something else.
"""
