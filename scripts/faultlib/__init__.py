"""Shared helpers of the fault-injection scripts (faults.py, badmount.py, sshfs_node.py).

Nothing in the product imports this package: it is for the scripts in ``scripts/`` only,
which find it because Python puts a script's own directory first on ``sys.path``.

Modules: ``cli`` (output lines / --json, errors and exit codes), ``mounts`` (mountinfo,
lazy unmounts, aborting a hung FUSE connection), ``procs`` (child processes by pid),
``state`` (the small JSON files that let a later process undo a fault), ``slivers``
(finding and laying out sliver files), ``corrupt`` (damaging them), ``misbehave`` and
``fusepass`` (the misbehaving FUSE passthrough behind badmount.py).
"""
