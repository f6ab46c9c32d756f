"""qfilters registry: the REST service through which teams submit calibration jobs and find validated filters.

It uses the ML core only through ``qfilters``' public API; ``qfilters`` never imports this package.
"""

__version__ = "0.1.0"
