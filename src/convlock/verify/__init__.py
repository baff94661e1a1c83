"""``convlock verify``: check a deployment's lock guarantees under real faults.

Worker processes (:mod:`.workers`) lock random conversations and do a fenced,
deliberately non-atomic read-modify-write of a per-conversation register
(:mod:`.register`) while a controller (:mod:`.runner`) injects faults
(:mod:`.faults`) and, optionally, runs a private Redis (:mod:`.spawn`).
Every event goes into a history (:mod:`.history`); a pure checker
(:mod:`.checker`) finds the violations; :mod:`.report` prints and writes them.
The command line is :mod:`.cli`.
"""
