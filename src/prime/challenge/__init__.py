"""prime.challenge — proof-of-compute matmul challenge.

The miner proves it did the n²·K work of C = A·B (A, B from a counter-based generator)
while the validator spends O(k·K): it opens k random rows of a Merkle commitment over
C's rows and recomputes m entries of each from the generator.

Modules: generator (matrix definition), merkle (row commitment), params (parameters,
sample sizes, time bound), prover (miner compute backends), verifier (pure checks),
service (miner HTTP routes), runner (validator client flow).
"""
