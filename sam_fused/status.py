"""The layout of the small device tensor that carries a step's scalars between kernels.

Every reduction lands here instead of on the host, so no kernel launch waits for a value;
kernels read the entries they need by index (kernels/common.py mirrors these numbers).
The first pass writes ``[SUMSQ, BAD1]`` and the second ``[BAD2, DOT, GP2, G2]``, each as
one contiguous slice, so one ``torch.sum(..., out=)`` finalizes either.
"""

SUMSQ = 0  # first pass: sum of u^2 (the squared global norm of the ascent direction)
BAD1 = 1  # first pass: non-finite gradient entries
SKIPPED = 2  # steps skipped so far for non-finite gradients (persistent)
GV2 = 3  # LookSAM: ||g_v||^2 of the stored orthogonal component (persistent)
BAD2 = 4  # second pass: non-finite gradient entries
DOT = 5  # GSAM / LookSAM: <g, g_p>
GP2 = 6  # GSAM / LookSAM: ||g_p||^2
G2 = 7  # LookSAM: ||g||^2 of the first pass
SIZE = 8
FIRST_PASS = slice(SUMSQ, BAD1 + 1)
SECOND_PASS = slice(BAD2, G2 + 1)
PERSISTENT = (SKIPPED, GV2)
