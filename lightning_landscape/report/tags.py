"""Every tag the library logs, spelled once.

The monitor, the probes, the hooks, the custom-scalars layout and ``lightning-landscape analyze``
all take their tag names from here, so a dashboard built on one of them reads the others too.
Everything sits under the ``landscape/`` prefix.

Example:
    >>> LAMBDA_MAX, eigenvalue(2), alpha_layer("conv1.weight")
    ('landscape/lambda_max', 'landscape/eigenvalues/2', 'landscape/alpha/conv1.weight')
    >>> cost_seconds("alpha_cost"), exact(LAMBDA_MAX)
    ('landscape/alpha_cost/seconds', 'landscape/lambda_max$')
"""

from __future__ import annotations

import re

PREFIX = "landscape"


def _tag(*parts: str) -> str:
    return "/".join((PREFIX, *parts))


# Sharpness: the top-k spectrum, λ_min and the optimizer's stability threshold.
LAMBDA_MAX = _tag("lambda_max")
EIGENVALUES = _tag("eigenvalues")  # the histogram; the scalars are eigenvalue(i)
EIGENVALUE_PATTERN = re.escape(EIGENVALUES) + r"/\d+$"  # every eigenvalue(i), for the layout
LAMBDA_MIN = _tag("lambda_min")
STABILITY_RATIO = _tag("stability_ratio")
STABILITY_THRESHOLD = _tag("stability_threshold")
PRECONDITIONED_LAMBDA_MAX = _tag("preconditioned_lambda_max")  # λ₁(P⁻¹H), Adam-family
PROBE_LOSS = _tag("probe_loss")
CONVERGED = _tag("converged")
MAX_RESIDUAL = _tag("max_residual")
TRAJECTORIES_FIGURE = _tag("eigenvalue_trajectories")
STABILITY_FIGURE = _tag("stability_ratio_trajectory")

# Curvature along the optimizer's last step, and batch sharpness.
UPDATE_CURVATURE = _tag("update", "curvature")
UPDATE_OVERSHOOT = _tag("update", "overshoot")
UPDATE_STEP_NORM = _tag("update", "step_norm")
UPDATE_DESCENT = _tag("update", "descent")
BATCH_SHARPNESS = _tag("batch_sharpness")
BATCH_SHARPNESS_STDERR = _tag("batch_sharpness_stderr")

# Trace and spectral density.
TRACE = _tag("trace")
TRACE_STDERR = _tag("trace_stderr")
NEGATIVE_MASS = _tag("negative_mass")
NEGATIVE_MASS_LOWER = _tag("negative_mass_lower")  # what the quadrature guarantees
NEGATIVE_MASS_UPPER = _tag("negative_mass_upper")
DENSITY_FIGURE = _tag("density")

# Curvature exponent α.
ALPHA = _tag("alpha")
ALPHA_R2 = _tag("alpha_r2")
ALPHA_GROUP = _tag("alpha_group")
ALPHA_FIGURE = _tag("alpha_fit")

# Stabilization Δ₂^(D) and its k-sweep.
DELTA2 = _tag("delta2_D")
DELTA2_PARTS = _tag("delta2")  # delta2_part(name): a, c_norm, trace_B, slope, term_mean, ...
DELTA2_SLOPE = _tag("delta2", "slope")
DELTA2_SLOPE_STDERR = _tag("delta2", "slope_stderr")
DELTA2_FIGURE = _tag("delta2_sweep")

# Loss slices.
SLICE_FIGURE = _tag("loss_slice")

# The monitor: failures and cost.
PROBE_FAILED = _tag("probe_failed")
COST = "cost"  # the cost group of the probes that share one Hessian operator per round
OVERHEAD = _tag("cost", "overhead")

# Hooks (curvature control).
CONTROL_LR_SCALE = _tag("control", "lr_scale")
CONTROL_RATIO = _tag("control", "stability_ratio_effective")
CONTROL_RHO = _tag("control", "rho")

# Files written by ``compare`` (not TensorBoard tags, but named the same way).
SPECTRA_FIGURE = _tag("spectra")
CONNECTIVITY_FIGURE = _tag("connectivity")


def eigenvalue(i: int) -> str:
    """The tag of the ``i``-th largest eigenvalue (0 is λ_max)."""
    return _tag("eigenvalues", str(i))


def alpha_layer(name: str) -> str:
    """The tag of one layer's α (``name``: the weight's parameter name)."""
    return f"{ALPHA}/{name}"


def alpha_r2(name: str) -> str:
    """The tag of one layer's α-fit R²."""
    return f"{ALPHA_R2}/{name}"


def alpha_group(kind: str) -> str:
    """The tag of the mean α of one layer type (``"conv"``, ``"attention"``, ...)."""
    return f"{ALPHA_GROUP}/{kind}"


def delta2_part(name: str) -> str:
    """The tag of one part of a Δ₂^(D) measurement (``"a"``, ``"c_norm"``, ``"term_mean"``, ...)."""
    return f"{DELTA2_PARTS}/{name}"


def cost_seconds(group: str) -> str:
    """The tag of a cost group's wall time (``group``: ``"cost"``, ``"alpha_cost"``, ...)."""
    return _tag(group, "seconds")


def cost_hvps(group: str) -> str:
    """The tag of a cost group's Hessian-vector products."""
    return _tag(group, "hvps")


def exact(tag: str) -> str:
    """A regular expression matching ``tag`` and nothing longer (for the layout)."""
    return re.escape(tag) + "$"


def starting(text: str) -> str:
    """A regular expression matching every tag that starts with ``text`` (for the layout)."""
    return re.escape(text) + ".*"


def family(tag: str) -> str:
    """A regular expression matching every tag under ``tag/`` (for the layout)."""
    return re.escape(tag) + "/.*"
