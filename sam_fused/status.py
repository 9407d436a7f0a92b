"""The layout of the small device tensor that carries a step's scalars between kernels.

Every reduction lands here instead of on the host, so no kernel launch waits for a value;
kernels read the entries they need by index (kernels/common.py mirrors these numbers).
The first pass writes ``[SUMSQ, BAD1]`` and the second ``[BAD2, DOT, GP2, G2]``, each as
one contiguous slice, so one ``torch.sum(..., out=)`` finalizes either. The gradient
factors (``INV_SCALE1``, ``INV_SCALE2``, ``CLIP``) are written on the device before the
kernels that read them, and are read only when the step scales or clips.
"""

SUMSQ = 0  # first pass: sum of u^2 (the squared global norm of the ascent direction)
BAD1 = 1  # first pass: non-finite gradient entries
SKIPPED = 2  # steps skipped so far for non-finite gradients (persistent)
GV2 = 3  # LookSAM: ||g_v||^2 of the stored orthogonal component (persistent)
BAD2 = 4  # second pass: non-finite gradient entries
DOT = 5  # GSAM / LookSAM: <g, g_p>
GP2 = 6  # GSAM / LookSAM: ||g_p||^2
G2 = 7  # LookSAM: ||g||^2 of the first pass
INV_SCALE1 = 8  # 1 / loss scale of the first pass's gradients (GradScaler); read when unscaling
INV_SCALE2 = 9  # 1 / loss scale of the second pass's gradients
CLIP = 10  # max_grad_norm: min(1, max_norm / (||descent gradient|| + 1e-6))
SIZE = 11
FIRST_PASS = slice(SUMSQ, BAD1 + 1)
SECOND_PASS = slice(BAD2, G2 + 1)
PERSISTENT = (SKIPPED, GV2)
