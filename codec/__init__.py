"""Red Stuff, the two-dimensional erasure code of Walrus, over GF(2^8) with blake3 commitments.

Pure and synchronous: imports numpy, blake3 and the standard library only; no I/O, no trio,
nothing else of walrusfs. Every function is safe to call from any thread; none keeps
global mutable state except read-only caches of coding matrices and XOR schedules.
"""
