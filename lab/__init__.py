"""The convergence lab: small, deterministic experiments that check the seed paper's claims.

Khanh et al., "Fundamental Convergence Analysis of Sharpness-Aware Minimization" (NeurIPS
2024) prove that SAM-type methods converge under diminishing step sizes and shrinking radii,
and show that a constant step can stall. The lab runs the real ``sam_fused`` optimizers on

* a strongly convex quadratic (:mod:`lab.quadratic`), where the stall and its size can be
  predicted in closed form, and
* scikit-learn's digits with a small MLP (:mod:`lab.digits`), where SGD and every variant
  are compared over several seeds, and
* the same digits with 0/20/40 % of the training labels flipped (:mod:`lab.label_noise`),
  which tests Foret et al.'s claim that SAM is robust to noisy labels, and
* the same noisy digits with a LayerNorm in the MLP (:mod:`lab.cost`), where the cheap
  variants (LookSAM, IntervalSAM, MSAM, AE-SAM, SAM-ON, SAM in a late window) are set
  against SGD and SAM by counted gradient evaluations and measured time.

:mod:`lab.claims` sets each published claim next to what the run measured
(:mod:`lab.cost_claims` adds a row per method of part 4).

``python -m lab.convergence_lab --out docs/lab`` writes the plots and ``results.md``;
``docs/convergence.md`` explains them.
"""
