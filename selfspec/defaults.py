"""Names the command line needs before anything heavy is imported (`dvi --help` must not load torch)."""

DEFAULT_MODEL = "smollm2-135m"
POLICIES = ("fixed", "threshold", "cost_aware")
