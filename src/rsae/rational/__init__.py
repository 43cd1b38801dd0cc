"""Rational gates for SAEs: r(t) = P(t) / Q(t) with a pole-free denominator, its fitting to the
fixed gates (ReLU, JumpReLU, TopK), shipped coefficient tables and L2 calibration.

Pure torch (the fitting additionally needs scipy, imported only by `rsae.rational.fit`).
"""

from rsae.rational.calibrate import calibrate_gate, relative_l2
from rsae.rational.coefficients import available_tables, load_table
from rsae.rational.function import T_MAX, rational
from rsae.rational.gate import RationalGate, exact_log

__all__ = ["rational", "T_MAX", "RationalGate", "exact_log", "load_table", "available_tables", "calibrate_gate", "relative_l2"]
